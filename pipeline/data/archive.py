"""Tar extraction that cannot write outside its target, and the limits on what it may expand to.

- :func:`safe_extract` extracts a tar (any compression) all-or-nothing into a directory, with
  Python's ``"data"`` extraction filter plus a few stricter checks (:class:`_StrictFilter`).
- :class:`ExtractLimits` bounds the member count, total size and expansion ratio of one archive
  (params ``data.extract_max_gb`` / ``extract_max_members`` / ``extract_max_ratio``).
- :class:`BoundedTarInfo` bounds the extension headers (pax, GNU long names) before tarfile parses
  them: their size, how many precede one member and the digit runs of a pax header.

Every failure the user can act on is a :class:`~pipeline.errors.UserError` with a one-line message
that names the archive (and the member) and says nothing was extracted.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from tqdm import tqdm

from pipeline.data.download import os_reason, tqdm_disable
from pipeline.errors import UserError

__all__ = ["safe_extract", "ExtractLimits", "BoundedTarInfo"]

# An extension header (pax 'x' / 'g' / Solaris 'X', GNU long name 'L' / long link 'K') is read whole
# and parsed before its member. Python < 3.12.6 parses pax records with regexes quadratic in a run
# of digits (CVE-2024-6232: a 385-byte .tar.gz with one 250,000-digit record costs 60-100 s of CPU).
MAX_EXT_HEADER = 64 << 10  # bytes of one extension header (a path is <= 4 KiB); 64 KiB parses in ms
MAX_EXT_CHAIN = 8          # extension headers before one member (a real one has at most g, x, L, K)
MAX_PAX_DIGITS = 64        # digits in a row in a pax header (its numbers have <= 20)
_PAX = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_GNU_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class UnsafeHeader(tarfile.TarError):
    """A member header refused before tarfile parses it (the message says which and why)."""


class _Replay:
    """The archive's file object, whose next read returns ``first``: bytes already read from it
    (checked before tarfile parses them); everything else is the file object's own."""

    def __init__(self, raw, first: bytes):
        self._raw, self._first = raw, first

    def read(self, size=-1):
        if self._first is None:
            return self._raw.read(size)
        first, self._first = self._first, None
        return first

    def __getattr__(self, name):
        return getattr(self._raw, name)


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo with bounded extension headers (MAX_EXT_HEADER, MAX_EXT_CHAIN,
    MAX_PAX_DIGITS), checked before tarfile reads or parses them; a header tarfile fails on with
    ValueError, IndexError or MemoryError (a 5000-digit pax length...) is an UnsafeHeader too."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except (ValueError, IndexError, OverflowError, MemoryError, RecursionError) as e:
            raise UnsafeHeader(f"an unreadable member header after byte {tarfile_.offset} "
                               f"({type(e).__name__})") from None

    def _proc_member(self, tarfile_):
        if self.type not in _PAX + _GNU_LONG:
            return super()._proc_member(tarfile_)
        kind = "pax" if self.type in _PAX else "GNU long name"
        if self.size > MAX_EXT_HEADER:
            raise UnsafeHeader(f"a {kind} header of {self.size} bytes at byte {self.offset} "
                               f"(at most {MAX_EXT_HEADER})")
        chain = getattr(tarfile_, "_segpipe_chain", 0)
        if chain >= MAX_EXT_CHAIN:
            raise UnsafeHeader(f"more than {MAX_EXT_CHAIN} extension headers in a row at byte {self.offset}")
        raw = tarfile_.fileobj
        tarfile_._segpipe_chain = chain + 1
        try:
            if self.type in _PAX:
                buf = raw.read(self._block(self.size))
                run = max(map(len, re.findall(rb"[0-9]+", buf)), default=0)
                if run > MAX_PAX_DIGITS:
                    raise UnsafeHeader(f"a pax header with {run} digits in a row at byte {self.offset} "
                                       f"(at most {MAX_PAX_DIGITS})")
                tarfile_.fileobj = _Replay(raw, buf)  # tarfile's _proc_pax reads the header first
            return super()._proc_member(tarfile_)
        finally:
            tarfile_.fileobj = raw
            tarfile_._segpipe_chain = chain


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
        self.bytes += max(0, member.offset_data - member.offset)  # its headers (pax, long names) expand too
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
            _extract_all(archive, tmp, limits, progress, current)
        except Exception as e:
            user_error = _extract_error(e, archive, dest_dir, current[0])
            if user_error is None:
                raise
            raise user_error from None
        dest_dir.mkdir(exist_ok=True)
        try:
            _merge(tmp, str(dest_dir))
        except OSError as e:
            raise UserError(
                f"extracted {archive} but could not move it into place under {dest_dir.parent} "
                f"({os_reason(e)}): fix permissions / free space and re-run (data.dir)"
            ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_all(archive: Path, tmp: str, limits: ExtractLimits, progress: bool,
                 current: list[tarfile.TarInfo | None]) -> None:
    """Every member into ``tmp`` through the strict filter, within ``limits``; ``current[0]`` is the
    member being extracted (for the error message)."""
    raw = open(archive, "rb")
    try:
        tf = tarfile.open(fileobj=raw, mode="r:*", tarinfo=BoundedTarInfo)
    except BaseException as e:
        raw.close()
        if not isinstance(e, tarfile.ReadError):
            raise
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

        with tqdm(members(), unit="file", desc=f"extract {archive.name}", disable=tqdm_disable(progress),
                  leave=False) as it:
            tf.extractall(tmp, members=it, filter=_StrictFilter())
        _check_end_of_archive(tf)
    _check_symlinks_inside(tmp)


def _extract_error(e: Exception, archive: Path, dest_dir: Path, member: tarfile.TarInfo | None) -> UserError | None:
    """The one-line UserError for a failed extraction (None: not ours to explain, re-raise)."""
    if isinstance(e, UserError):
        return e
    if isinstance(e, _LimitExceeded):
        return UserError(str(e))
    if isinstance(e, UnsafeHeader):
        return UserError(f"refused archive {archive}: {e}: a hostile or corrupt tar (data.source); "
                         f"nothing was extracted")
    if isinstance(e, tarfile.FilterError):
        return UserError(f"refused archive {archive}: {_describe_filter_error(e)}; nothing was extracted")
    if isinstance(e, (tarfile.TarError, EOFError, zlib.error, KeyError)):
        where = f" at member {member.name!r}" if member is not None else ""
        reason = " ".join(str(e).split()) or type(e).__name__
        return UserError(f"cannot extract {archive}{where}: {reason} (truncated or corrupt archive: delete it "
                         f"and download it again); nothing was extracted")
    if isinstance(e, OSError):
        if type(e).__module__ in ("lzma", "bz2", "gzip") or "compressed" in str(e).lower():
            return UserError(f"cannot extract {archive}: {e} (corrupt or truncated archive: download it again)")
        where = f" member {member.name!r} of" if member is not None else ""
        return UserError(f"cannot extract{where} {archive} ({os_reason(e)}); nothing was extracted: "
                         f"free space or fix permissions under {dest_dir.parent} (data.dir)")
    if type(e).__module__ in ("lzma", "_lzma", "bz2", "_bz2"):  # lzma.LZMAError and friends: corrupt data
        return UserError(f"cannot extract {archive}: {e} (corrupt or truncated archive: download it again)")
    return None
