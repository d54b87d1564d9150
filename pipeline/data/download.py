"""Downloads that resume and verify, and the file hashes the data layer checks.

- :func:`download` streams a URL (``http(s)://`` or ``file://``) to ``<dest>.part``, resumes an
  interrupted download with an HTTP ``Range`` request, checks the md5 and only then renames the
  part file to ``dest``.
- :func:`md5sum` / :func:`sha256sum`: hex digests of a file, read in chunks.

Extraction of what was downloaded lives in :mod:`pipeline.data.archive`.

Every failure the user can act on is a :class:`~pipeline.errors.UserError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from pipeline.errors import UserError

__all__ = ["download", "md5sum", "sha256sum"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # 1 MiB
USER_AGENT = "segpipe-download/1.0"
_OFFLINE_HINT = "put the file at {dest} or set data.source to a local VOC tar / directory holding VOCdevkit/"


# ----------------------------------------------------------------------------------------- hashes
def _hexdigest(path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def md5sum(path) -> str:
    """Hex md5 of a file, read in chunks."""
    return _hexdigest(path, "md5")


def sha256sum(path) -> str:
    """Hex sha256 of a file, read in chunks."""
    return _hexdigest(path, "sha256")


# --------------------------------------------------------------------------------------- download
def tqdm_disable(progress: bool):
    # None = tqdm turns itself off when stderr is not a terminal
    return None if progress else True


def _part_path(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def _connection_error(url: str, dest: Path, reason) -> UserError:
    return UserError(f"cannot download {url} ({reason}): offline? " + _OFFLINE_HINT.format(dest=dest))


def os_reason(exc: BaseException) -> str:
    """A short human reason for a network / file error."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        if not isinstance(exc.reason, BaseException):
            return str(exc.reason)
        exc = exc.reason
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host name: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _interrupted(url: str, part: Path, got: int, total: int | None, reason: str) -> UserError:
    of = f" of {total}" if total is not None else ""
    return UserError(
        f"download of {url} was cut after {got}{of} bytes ({reason}); the partial file {part} "
        f"is kept: re-run to resume"
    )


def _verify_and_finish(url: str, part: Path, dest: Path, md5: str | None) -> Path:
    if md5 is not None:
        got = md5sum(part)
        if got.lower() != md5.lower():
            part.unlink(missing_ok=True)
            raise UserError(
                f"checksum mismatch for {url}: expected md5 {md5.lower()}, got {got}; the download "
                f"was deleted: re-run to fetch it again, or check the URL / data.source"
            )
    os.replace(part, dest)
    return dest


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.I)


def _int_header(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _LocalResponse:
    """The subset of an HTTP response that :func:`download` reads, for ``file://`` URLs
    (urllib's own file handler ignores ``Range``)."""

    def __init__(self, path: Path, offset: int):
        size = path.stat().st_size
        self._f = open(path, "rb")
        self.total = size
        if 0 < offset <= size:
            self.status = 206 if offset < size else 416
            self._f.seek(offset)
            self.start = offset
        else:
            self.status = 200
            self.start = 0
        self.length = size - self.start

    def read(self, n: int) -> bytes:
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()


def _open_file_url(url: str, dest: Path, offset: int) -> _LocalResponse:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise UserError(f"cannot download {url}: only local file:// URLs are supported (file:///path)")
    path = Path(urllib.request.url2pathname(parsed.path))
    if not path.is_file():
        raise UserError(
            f"cannot download {url}: {path} does not exist or is not a file; "
            + _OFFLINE_HINT.format(dest=dest)
        )
    try:
        return _LocalResponse(path, offset)
    except OSError as e:
        raise UserError(f"cannot download {url}: cannot read {path} ({os_reason(e)})") from None


def download(
    url: str,
    dest: Path,
    md5: str | None = None,
    timeout: float = 20.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    - If ``dest`` exists and has the expected md5 (or no md5 is given), nothing is fetched.
    - Bytes go to ``<dest>.part``; an existing part file is resumed with ``Range: bytes=N-``
      (206: append; 200: the server ignored the range, start again; 416: the part is already
      complete, it is verified).
    - With ``md5``, the finished file is checked; on mismatch it is deleted and a
      :class:`UserError` is raised. ``dest`` only appears once complete and verified.
    - Connection failures fail at once (no retries); a transfer cut midway keeps the part file
      so that the next call resumes.
    """
    dest = Path(dest)
    if dest.is_file():
        if md5 is None:
            return dest
        if md5sum(dest).lower() == md5.lower():
            return dest
        log.warning("%s exists but its md5 is not %s: downloading it again", dest, md5)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    is_file_url = urllib.parse.urlparse(url).scheme.lower() == "file"

    for _attempt in range(2):  # a second pass only to restart from zero after a bad partial
        offset = part.stat().st_size if part.is_file() else 0
        if is_file_url:
            resp = _open_file_url(url, dest, offset)
            opened = (resp, resp.status, resp.total, resp.start, resp.length)
        else:
            opened = _open_http(url, dest, part, offset, timeout)
        if opened == "restart":
            continue
        if opened == "complete":
            return _verify_and_finish(url, part, dest, md5)
        resp, status, total, start, length = opened
        if status == 416:  # a file:// URL whose part already has every byte
            resp.close()
            return _verify_and_finish(url, part, dest, md5)
        if offset and not start:
            log.info("%s ignored the Range request: downloading %s from the start", url, dest.name)
        got, reason = _stream(resp, part, start, total, progress, dest.name)
        expected_end = total if total is not None else (start + length if length is not None else None)
        if reason is not None:
            raise _interrupted(url, part, got, expected_end, reason)
        if expected_end is not None and got < expected_end:
            raise _interrupted(url, part, got, expected_end, "connection closed early")
        if expected_end is not None and got > expected_end:
            part.unlink()
            raise UserError(
                f"download of {url} produced {got} bytes but the server announced {expected_end}; "
                f"the partial file was deleted: re-run to download again"
            )
        return _verify_and_finish(url, part, dest, md5)

    raise UserError(f"cannot download {url}: the server keeps answering with the wrong byte range; "
                    + _OFFLINE_HINT.format(dest=dest))


def _open_http(url: str, dest: Path, part: Path, offset: int, timeout: float):
    """Open ``url`` from byte ``offset``: (response, status, total, start, length), or "restart"
    (the part file does not match the remote file: it was deleted) or "complete" (416: the part
    file already holds every byte)."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    opener = urllib.request.build_opener()  # reads *_proxy env vars now, not at import
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            m = _UNSATISFIED_RANGE.search(e.headers.get("Content-Range", "") or "")
            if m and int(m.group(1)) != offset:
                part.unlink()  # the part file does not match the remote file: start again
                return "restart"
            return "complete"
        raise UserError(
            f"cannot download {url} (HTTP {e.code} {e.reason}): check the URL, or "
            + _OFFLINE_HINT.format(dest=dest)
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise _connection_error(url, dest, os_reason(e)) from None
    status = resp.status
    length = _int_header(resp.headers.get("Content-Length"))
    if status != 206:
        return resp, status, length, 0, length
    m = _CONTENT_RANGE.search(resp.headers.get("Content-Range", "") or "")
    if not m or int(m.group(1)) != offset:
        resp.close()
        part.unlink()  # a range we did not ask for: start again from zero
        return "restart"
    return resp, status, (int(m.group(3)) if m.group(3) != "*" else None), offset, length


def _stream(resp, part: Path, start: int, total: int | None, progress: bool, name: str) -> tuple[int, str | None]:
    """Append (start > 0) or write the response body to ``part``; returns (bytes the part file now
    holds, why the transfer was cut or None). Closes ``resp``."""
    got = start
    reason = None
    try:
        with open(part, "ab" if start else "wb") as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
            disable=tqdm_disable(progress), leave=False,
        ) as bar:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (http.client.HTTPException, OSError) as e:  # IncompleteRead, reset, timeout
                    partial = getattr(e, "partial", b"") or b""  # IncompleteRead carries the bytes it did get
                    if partial:
                        out.write(partial)
                        got += len(partial)
                    reason = os_reason(e)
                    break
                if not chunk:
                    break
                out.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    except OSError as e:  # writing failed (disk full, permissions): not resumable as such
        raise UserError(f"cannot write {part} ({os_reason(e)}): free space or fix permissions, then re-run") from None
    finally:
        resp.close()
    return got, reason
