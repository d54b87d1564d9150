"""Downloads that resume and verify, and tar extraction that cannot write outside its target.

- :func:`download` streams a URL (``http(s)://`` or ``file://``) to ``<dest>.part``, resumes an
  interrupted download with an HTTP ``Range`` request, checks the md5 and only then renames the
  part file to ``dest``.
- :func:`safe_extract` extracts a tar (any compression) all-or-nothing into a directory, with
  Python's ``"data"`` extraction filter plus a few stricter checks.

Every failure the user can act on is a :class:`~pipeline.errors.UserError` with a one-line message.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import io
import logging
import os
import re
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from pipeline.errors import UserError

__all__ = ["download", "md5sum", "sha256sum", "safe_extract", "ExtractLimits"]

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
def _tqdm_disable(progress: bool):
    # None = tqdm turns itself off when stderr is not a terminal
    return None if progress else True


def _part_path(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def _connection_error(url: str, dest: Path, reason) -> UserError:
    return UserError(f"cannot download {url} ({reason}): offline? " + _OFFLINE_HINT.format(dest=dest))


def _reason(exc: BaseException) -> str:
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
        raise UserError(f"cannot download {url}: cannot read {path} ({_reason(e)})") from None


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

        # ---- open
        if is_file_url:
            resp = _open_file_url(url, dest, offset)
            status, total, start, length = resp.status, resp.total, resp.start, resp.length
        else:
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
                        # the part file does not match the remote file: start again
                        part.unlink()
                        continue
                    return _verify_and_finish(url, part, dest, md5)
                raise UserError(
                    f"cannot download {url} (HTTP {e.code} {e.reason}): check the URL, or "
                    + _OFFLINE_HINT.format(dest=dest)
                ) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
                raise _connection_error(url, dest, _reason(e)) from None
            status = resp.status
            length = _int_header(resp.headers.get("Content-Length"))
            if status == 206:
                m = _CONTENT_RANGE.search(resp.headers.get("Content-Range", "") or "")
                if not m or int(m.group(1)) != offset:
                    resp.close()
                    part.unlink()  # a range we did not ask for: start again from zero
                    continue
                start = offset
                total = int(m.group(3)) if m.group(3) != "*" else None
            else:
                start = 0
                total = length

        # ---- 416 for a file:// URL (the part already has every byte)
        if status == 416:
            resp.close()
            return _verify_and_finish(url, part, dest, md5)

        # ---- stream
        mode = "ab" if start else "wb"
        if offset and not start:
            log.info("%s ignored the Range request: downloading %s from the start", url, dest.name)
        got = start
        reason = None
        try:
            with open(part, mode) as out, tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=_tqdm_disable(progress),
                leave=False,
            ) as bar:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (http.client.HTTPException, OSError) as e:  # IncompleteRead, reset, timeout
                        # IncompleteRead carries the bytes it did get
                        partial = getattr(e, "partial", b"") or b""
                        if partial:
                            out.write(partial)
                            got += len(partial)
                        reason = _reason(e)
                        break
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except OSError as e:  # writing failed (disk full, permissions): not resumable as such
            raise UserError(f"cannot write {part} ({_reason(e)}): free space or fix permissions, then re-run") from None
        finally:
            resp.close()

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


# ---------------------------------------------------------------------------------- safe_extract
class ExtractLimits:
    """Upper bounds on what one archive may expand to, checked member by member while streaming
    (from the tar headers, before a member's bytes are written). The defaults fit the real VOC2012
    trainval tar (~2 GB, ~40k members) and SBD's benchmark.tgz (~1.4 GB -> ~2.5 GB, ~35k members)
    with room to spare; each limit names its params knob in the error."""

    # compressed input read before the ratio is judged: a small archive may hold one well-
    # compressible file without tripping the ratio check
    RATIO_FLOOR = 8 << 20

    def __init__(self, max_bytes: int = 16 << 30, max_members: int = 200_000, max_ratio: float = 100.0,
                 knobs: dict[str, str] | None = None):
        self.max_bytes = int(max_bytes)
        self.max_members = int(max_members)
        self.max_ratio = float(max_ratio)
        self.knobs = {"bytes": "data.extract_max_gb", "members": "data.extract_max_members",
                      "ratio": "data.extract_max_ratio", **(knobs or {})}

    @classmethod
    def from_params(cls, data) -> "ExtractLimits":
        return cls(max_bytes=int(data.extract_max_gb * (1 << 30)), max_members=data.extract_max_members,
                   max_ratio=data.extract_max_ratio)


class _LimitExceeded(Exception):
    pass


class _Budget:
    """Running totals of one extraction; raises _LimitExceeded with the user message."""

    def __init__(self, archive: Path, limits: ExtractLimits, raw):
        self.archive, self.limits, self.raw = archive, limits, raw
        self.members = 0
        self.bytes = 0
        self.compressed = archive.stat().st_size

    def _stop(self, what: str, knob: str, hint: str) -> None:
        raise _LimitExceeded(f"refused archive {self.archive}: {what} ({knob}{hint}); nothing was extracted")

    def add(self, member: tarfile.TarInfo) -> None:
        lim = self.limits
        self.members += 1
        if self.members > lim.max_members:
            self._stop(f"it holds more than {lim.max_members} members", lim.knobs["members"],
                       " raises the limit")
        self.bytes += max(0, int(member.size)) if member.isreg() else 0
        if self.bytes > lim.max_bytes:
            self._stop(f"it expands to more than {lim.max_bytes / (1 << 30):.3g} GB", lim.knobs["bytes"],
                       " raises the limit")
        try:  # compressed bytes read so far (the raw file under the decompressor)
            read = max(self.raw.tell(), 1)
        except (OSError, ValueError):
            read = self.compressed
        ratio = self.bytes / max(read, min(self.compressed, ExtractLimits.RATIO_FLOOR), 1)
        if ratio > lim.max_ratio:
            self._stop(f"it expands more than {lim.max_ratio:g} times its compressed size (a "
                       f"decompression bomb?)", lim.knobs["ratio"], " raises the limit")


class _ThroughLinkError(tarfile.FilterError):
    def __init__(self, tarinfo, link):
        self.tarinfo = tarinfo
        self.link = link
        super().__init__(f"{tarinfo.name!r} would be written through the symlink {link!r}")


def _norm_parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


class _StrictFilter:
    """tarfile's ``data`` filter plus: absolute member names are refused (``data`` would only
    strip the slash), ``..`` is refused anywhere in a name or a hardlink target, and no member may
    be written through (or over) a symlink that the archive itself created. Together these keep
    every write inside the extraction directory even where ``os.path.realpath`` can be fooled."""

    def __init__(self):
        self.symlinks: set[str] = set()

    def _check_path(self, member, name: str, link: bool = False) -> list[str]:
        if name.startswith(("/", "\\")) or os.path.isabs(name):
            raise tarfile.AbsoluteLinkError(member) if link else tarfile.AbsolutePathError(member)
        parts = _norm_parts(name)
        if ".." in parts:
            if link:
                raise tarfile.LinkOutsideDestinationError(member, name)
            raise tarfile.OutsideDestinationError(member, name)
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if prefix in self.symlinks:
                raise _ThroughLinkError(member, prefix)
        return parts

    def __call__(self, member: tarfile.TarInfo, dest_path: str):
        parts = self._check_path(member, member.name)
        if member.islnk():  # a hardlink's target is a path inside the archive: same rules
            self._check_path(member, member.linkname, link=True)
        new = tarfile.data_filter(member, dest_path)
        if new is not None and new.issym():
            self.symlinks.add("/".join(parts))
        return new


def _describe_filter_error(e: tarfile.FilterError) -> str:
    ti = getattr(e, "tarinfo", None)
    name = ti.name if ti is not None else "?"
    if isinstance(e, (tarfile.AbsolutePathError, tarfile.OutsideDestinationError)):
        return f"member {name!r} would be written outside the target (absolute path or '..')"
    if isinstance(e, (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError)):
        return f"member {name!r} is a link to {ti.linkname!r}, outside the target"
    if isinstance(e, tarfile.SpecialFileError):
        return f"member {name!r} is a device, FIFO or other special file"
    if isinstance(e, _ThroughLinkError):
        return f"member {name!r} would be written through the symlink {e.link!r} from the same archive"
    return f"member {name!r}: {e}"


def _check_end_of_archive(tf: tarfile.TarFile) -> None:
    """tarfile treats a header-sized cut as the end of the archive; a complete archive ends with a
    zero block. Raise ReadError when it is missing (a truncated download)."""
    fobj = tf.fileobj
    try:
        read_after = fobj.tell() - tf.offset
    except (AttributeError, OSError, ValueError):
        return
    if read_after < tarfile.BLOCKSIZE:
        raise tarfile.ReadError("unexpected end of data (no end-of-archive marker)")
    if isinstance(fobj, io.BufferedReader):  # uncompressed: cheap to look at the block again
        fobj.seek(tf.offset)
        if fobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError(f"invalid header at byte {tf.offset}")


def _is_real_dir(p: str) -> bool:
    return os.path.isdir(p) and not os.path.islink(p)


def _remove(p: str) -> None:
    if _is_real_dir(p):
        shutil.rmtree(p)
    else:
        os.unlink(p)


def _move(src: str, dst: str) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        if os.path.lexists(dst):
            _remove(dst)
        shutil.move(src, dst)


def _merge(src_dir: str, dst_dir: str) -> None:
    """Move every entry of src_dir into dst_dir; directories merge, anything else replaces.
    A symlink in dst_dir is never followed (it is replaced)."""
    for entry in os.scandir(src_dir):
        src = entry.path
        dst = os.path.join(dst_dir, entry.name)
        src_is_dir = entry.is_dir(follow_symlinks=False)
        if not os.path.lexists(dst):
            _move(src, dst)
        elif src_is_dir and _is_real_dir(dst):
            _merge(src, dst)
        else:
            if src_is_dir or _is_real_dir(dst):
                _remove(dst)  # a file replaced by a directory or the other way round
            _move(src, dst)


def _check_symlinks_inside(root: str) -> None:
    """After extraction, every symlink must resolve inside ``root`` (now that all of them exist)."""
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                target = os.path.realpath(p)
                if os.path.commonpath([real_root, target]) != real_root:
                    rel = os.path.relpath(p, root)
                    raise tarfile.LinkOutsideDestinationError(
                        tarfile.TarInfo(rel.replace(os.sep, "/")), target
                    )


def safe_extract(archive: Path, dest_dir: Path, progress: bool = True, limits: ExtractLimits | None = None) -> None:
    """Extract the tar ``archive`` (any compression) into ``dest_dir``, all or nothing.

    Members are first extracted into a fresh temporary directory next to ``dest_dir`` with
    Python's ``"data"`` filter (plus stricter checks: no absolute names, no ``..``, no writing
    through symlinks, no links or device files pointing outside). Only when every member is fine
    are the entries moved into ``dest_dir`` (which may already exist: directories merge, files of
    the same path are replaced). On any error the temporary directory is removed, ``dest_dir`` is
    untouched and a :class:`UserError` names the archive and the offending member.

    ``limits`` (default :class:`ExtractLimits`) bound the member count, the total size and the
    expansion ratio; they are checked from each member's header before its bytes are written, so
    a decompression bomb stops after at most one member's worth of data... which the total-size
    limit also bounds.
    """
    archive = Path(archive)
    dest_dir = Path(dest_dir)
    if not hasattr(tarfile, "data_filter"):
        raise UserError("safe tar extraction needs Python >= 3.11.4 (tarfile filters): upgrade Python")
    if not archive.is_file():
        raise UserError(f"archive not found: {archive} (check data.source or re-run the fetch stage)")
    if dest_dir.exists() and not dest_dir.is_dir():
        raise UserError(f"cannot extract {archive}: {dest_dir} exists and is not a directory; move it away")
    limits = limits or ExtractLimits()
    dest_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp = tempfile.mkdtemp(prefix=f".{dest_dir.name}.tmp-", dir=dest_dir.parent)
    current: list[tarfile.TarInfo | None] = [None]
    try:
        try:
            raw = open(archive, "rb")
            try:
                tf = tarfile.open(fileobj=raw, mode="r:*")
            except tarfile.ReadError:
                raw.close()
                raise UserError(
                    f"cannot extract {archive}: not a tar archive (plain, gz, bz2 or xz), or truncated / "
                    f"corrupt: check data.source or delete it and download it again"
                ) from None
            budget = _Budget(archive, limits, raw)
            with raw, tf:
                tf.errorlevel = 1

                def members():
                    for m in tf:
                        current[0] = m
                        budget.add(m)
                        yield m

                with tqdm(
                    members(),
                    unit="file",
                    desc=f"extract {archive.name}",
                    disable=_tqdm_disable(progress),
                    leave=False,
                ) as it:
                    tf.extractall(tmp, members=it, filter=_StrictFilter())
                _check_end_of_archive(tf)
            _check_symlinks_inside(tmp)
        except _LimitExceeded as e:
            raise UserError(str(e)) from None
        except tarfile.FilterError as e:
            raise UserError(f"refused archive {archive}: {_describe_filter_error(e)}; nothing was extracted") from None
        except (tarfile.TarError, EOFError, zlib.error, KeyError) as e:
            where = f" at member {current[0].name!r}" if current[0] is not None else ""
            reason = " ".join(str(e).split()) or type(e).__name__
            raise UserError(
                f"cannot extract {archive}{where}: {reason} (truncated or corrupt archive: delete it "
                f"and download it again); nothing was extracted"
            ) from None
        except OSError as e:
            if type(e).__module__ in ("lzma", "bz2", "gzip") or "compressed" in str(e).lower():
                raise UserError(
                    f"cannot extract {archive}: {e} (corrupt or truncated archive: download it again)"
                ) from None
            where = f" member {current[0].name!r} of" if current[0] is not None else ""
            raise UserError(
                f"cannot extract{where} {archive} ({_reason(e)}); nothing was extracted: "
                f"free space or fix permissions under {dest_dir.parent} (data.dir)"
            ) from None
        except Exception as e:  # lzma.LZMAError and friends: corrupt compressed data
            if type(e).__module__ in ("lzma", "_lzma", "bz2", "_bz2"):
                raise UserError(
                    f"cannot extract {archive}: {e} (corrupt or truncated archive: download it again)"
                ) from None
            raise
        dest_dir.mkdir(exist_ok=True)
        try:
            _merge(tmp, str(dest_dir))
        except OSError as e:
            raise UserError(
                f"extracted {archive} but could not move it into place under {dest_dir.parent} "
                f"({_reason(e)}): fix permissions / free space and re-run (data.dir)"
            ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
