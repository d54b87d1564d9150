"""Files and directories: snapshots (to show nothing changed), leftover staging/temp files, the
sample VOC tree, params for a data dir, and read-only / tiny mounts (the reliability tests)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from tests.support.paths import SAMPLE_TAR

TEMP_MARKERS = (".raw-new", ".shards-new", ".raw-old", ".shards-old", ".tmp-", ".lock")


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path -> its bytes (to show nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def no_debris(d: Path) -> None:
    """No staging dir, temp file or lock left anywhere under d."""
    left = [str(p.relative_to(d)) for p in d.rglob("*") if any(m in p.name for m in TEMP_MARKERS)]
    assert not left, left


def params(params_file: Path, data_dir: Path, *extra: str):
    """The params of params_file with data.dir=data_dir and the extra overrides."""
    from pipeline.config import load_params

    return load_params(params_file, [f"data.dir={data_dir}", *extra])


def copy_sample_voc(tmp_path: Path) -> Path:
    """An in-place VOC source dir (data.source=<dir>) made from the sample tar."""
    import tarfile

    src = tmp_path / "src"
    with tarfile.open(SAMPLE_TAR) as tf:
        tf.extractall(src, filter="data")
    return src


@contextlib.contextmanager
def mounted(kind: str, target: Path, source: Path | None = None, size: str = "1m"):
    """kind "ro": bind-mount target read-only onto itself; "tmpfs": a tiny tmpfs at target."""
    target.mkdir(parents=True, exist_ok=True)
    if kind == "ro":
        cmds = [["mount", "--bind", str(source or target), str(target)],
                ["mount", "-o", "remount,bind,ro", str(target)]]
    else:
        cmds = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)]]
    done = 0
    try:
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot mount ({' '.join(cmd)}: {r.stderr.strip() or r.returncode})")
            done += 1
        yield target
    finally:
        if done:
            subprocess.run(["umount", str(target)], capture_output=True)
