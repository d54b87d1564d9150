"""Files and directories: the only home of path handling, atomic swaps and the data-dir lock.

Paths that may be local or remote: everything that Ray workers on other nodes read (shards)
or that the driver and Ray share (checkpoints, Tune results) goes through pyarrow.fs, so
`data.dir` and `ray.storage_path` can be a local/shared path or a cloud URI (s3://, gs://, ...).

The data directory:

The one-writer rule for <data.dir> and the clean-up of what an interrupted writer left there.

- :func:`writer_lock` is held by `segpipe fetch` and `segpipe preprocess` for their whole run:
  an exclusive ``fcntl.flock`` on ``<data.dir>/.lock`` (the holder's pid written in it). A second
  writer fails at once with ``error: <dir> is being written by pid N``. The kernel drops the lock
  when its holder dies, so a lock file left by a killed run is simply taken over. The holder
  unlinks the file before it lets go (a taker checks that the inode it locked is still the one
  at the path), so a finished run leaves nothing in <data.dir>.
- :func:`clean_debris` (called under the lock) removes the temporary directories an interrupted
  fetch / preprocess leaves: ``.raw-new``, ``..raw-new.tmp-*`` (safe_extract's staging dir),
  ``.shards-new`` and the ``.raw-old`` / ``.shards-old`` of a swap; when a swap was cut between
  its two renames (``raw`` gone, ``.raw-old`` there) the old set is put back instead.
- :func:`os_error` turns an OSError while writing <data.dir> into a one-line UserError that names
  data.dir, never a temporary path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import posixpath
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.errors import UserError

REPO = Path(__file__).resolve().parent.parent  # the checkout (assets/, profiles/, seg_models/ live here)


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(location: str | Path) -> str:
    """A URI as it is; a local path made absolute (workers may run with another cwd)."""
    return str(location) if is_uri(str(location)) else str(Path(location).resolve())


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    location = str(location)
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def join(location: str | Path, *parts: str) -> str:
    location = str(location)
    return posixpath.join(location, *parts) if is_uri(location) else str(Path(location, *parts))


def exists(location: str | Path) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str | Path) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str | Path, text: str) -> None:
    fs, path = filesystem(location)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def list_dirs(location: str | Path) -> list[str]:
    """Names of the sub-directories of `location` ([] when it does not exist)."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory)


def open_parquet(location: str):
    """A pyarrow ParquetFile over any filesystem."""
    import pyarrow.parquet as pq

    fs, path = filesystem(location)
    return pq.ParquetFile(fs.open_input_file(path))


OWNER_MARK = ".segpipe"  # in every directory segpipe replaces as a whole: the proof that it made it
_MARK_TEXT = "made by segpipe: the next run replaces this directory as a whole; do not keep your files here\n"


def made_by_segpipe(path: Path, legacy: tuple[str, ...] = ()) -> bool:
    """True when `path` does not exist or carries segpipe's mark (OWNER_MARK, or one of the `legacy`
    files an older segpipe wrote there before the mark existed)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return True
    return path.is_dir() and any((path / name).is_file() for name in (OWNER_MARK, *legacy))


def check_owned(path: Path, knob: str, legacy: tuple[str, ...] = ()) -> None:
    """Refuse to replace a directory segpipe did not make (a user's own folder in its place)."""
    if not made_by_segpipe(path, legacy):
        raise UserError(f"{path} exists and segpipe did not make it (no {OWNER_MARK} file in it): segpipe "
                        f"replaces it as a whole, so move your files away or choose another {knob}; "
                        f"nothing was changed ({knob})")


def swap_in(new: Path, dest: Path, knob: str = "data.dir", legacy: tuple[str, ...] = ()) -> None:
    """Replace the local directory `dest` by the complete `new` one (two renames: readers see the
    old or the new set, never a mix); the old set is removed afterwards. Only a `dest` segpipe made
    is replaced (check_owned); `new` gets the mark."""
    check_owned(dest, knob, legacy)
    (new / OWNER_MARK).write_text(_MARK_TEXT)
    old = dest.with_name(f".{dest.name}-old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Write a file atomically: yields a temporary path beside ``path``; when the block ends without
    an exception it replaces ``path`` (a reader sees the old file or the new one, never half of one);
    the temporary file is removed in every case. The one home of segpipe's write-then-rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# --- the data directory: one writer, debris clean-up ---

LOCK_NAME = ".lock"
# (final dir, its staging dirs): everything here is only ever written under the lock
_OWNED = {"raw": (".raw-new", ".raw-old"), "shards": (".shards-new", ".shards-old")}
_STAGING_GLOBS = ("..raw-new.tmp-*", ".raw.tmp-*", ".shards.tmp-*")


def os_error(exc: OSError, data_dir: Path, doing: str) -> UserError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EROFS: "it is on a read-only file system: choose another",
            errno.ENOTDIR: "it (or a parent) is a file, not a directory: choose another path",
            errno.EEXIST: "it exists and is not a directory: choose another path",
            errno.EACCES: "fix its permissions", errno.EPERM: "fix its permissions"}.get(exc.errno, "check it")
    return UserError(f"cannot {doing} in {data_dir} ({reason}): {hint}; earlier outputs are untouched (data.dir)")


def ensure_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"{data_dir} is a file, not a directory: choose another path (data.dir)")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, data_dir, "create the data directory") from None


@contextlib.contextmanager
def writer_lock(data_dir: str | Path):
    """Hold the exclusive writer lock of data_dir for the block (see module doc)."""
    data_dir = Path(data_dir)
    ensure_dir(data_dir)
    path = data_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise os_error(exc, data_dir, "create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            except OSError:
                pid = "?"
            os.close(fd)
            raise UserError(f"{data_dir} is being written by pid {pid} (another fetch/preprocess): "
                            f"wait for it to finish (data.dir)") from None
        try:  # the holder we waited on may have unlinked the file: lock the one at `path` only
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds anyway, only the pid in the message is missing
        yield path
    finally:
        try:
            os.unlink(path)  # still holding the lock: no output of ours is left behind
        except OSError:
            pass
        os.close(fd)  # releases the flock


def clean_debris(data_dir: str | Path) -> list[str]:
    """Remove what interrupted writers left in data_dir (call with the writer lock held)."""
    data_dir = Path(data_dir)
    removed = []
    for final, (new, old) in _OWNED.items():
        old_p, final_p = data_dir / old, data_dir / final
        if old_p.is_dir() and not final_p.exists():
            old_p.rename(final_p)  # a swap cut between its two renames: the old set comes back
        for name in (new, old):
            p = data_dir / name
            if p.exists() or p.is_symlink():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(name)
    for pattern in _STAGING_GLOBS:
        for p in data_dir.glob(pattern):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p.name)
    return removed
