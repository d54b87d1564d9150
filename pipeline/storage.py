"""Paths that may be local or remote: everything that Ray workers on other nodes read (shards)
or that the driver and Ray share (checkpoints, Tune results) goes through pyarrow.fs, so
`data.dir` and `ray.storage_path` can be a local/shared path or a cloud URI (s3://, gs://, ...)."""

from __future__ import annotations

import posixpath
import shutil
from pathlib import Path

import pyarrow.fs as pafs


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


def swap_in(new: Path, dest: Path) -> None:
    """Replace the local directory `dest` by the complete `new` one (two renames: readers see the
    old or the new set, never a mix); the old set is removed afterwards."""
    old = dest.with_name(f".{dest.name}-old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    if old.exists():
        shutil.rmtree(old)
