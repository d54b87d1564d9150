"""Shared pieces of the reliability suite (issue 15): sample data fetched once per test, mounts
for read-only / full file systems (skipped with the reason when mounting is refused), a
loopback HTTP server answering 401, and the "no temp dir left" check."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.data.sources import fetch
from pipeline.data.shards import preprocess

TEMP_MARKERS = (".raw-new", ".shards-new", ".raw-old", ".shards-old", ".tmp-", ".lock")


def no_debris(d: Path) -> None:
    """No staging dir, temp file or lock left anywhere under d."""
    left = [str(p.relative_to(d)) for p in d.rglob("*") if any(m in p.name for m in TEMP_MARKERS)]
    assert not left, left


def params(params_file: Path, data_dir: Path, *extra: str):
    return load_params(params_file, [f"data.dir={data_dir}", *extra])


@pytest.fixture
def sample_dir(tmp_path, params_file) -> Path:
    """<tmp>/D with raw/ and shards/ of the bundled 10-image sample (in-process: fast)."""
    d = tmp_path / "D"
    p = params(params_file, d, "data.source=sample", "data.workers=1")
    fetch(p, progress=False)
    preprocess(p, progress=False)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class _Deny(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b'{"error_code": "UNAUTHENTICATED", "message": "credentials required"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def deny_server():
    """http://127.0.0.1:<port> answering every request with 401 (an auth proxy without our token)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Deny)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def silent_server():
    """http://127.0.0.1:<port> that accepts connections (kernel backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def copy_sample_voc(tmp_path: Path) -> Path:
    """An in-place VOC source dir (data.source=<dir>) made from the sample tar."""
    import tarfile

    from tests.conftest import SAMPLE_TAR

    src = tmp_path / "src"
    with tarfile.open(SAMPLE_TAR) as tf:
        tf.extractall(src, filter="data")
    return src


__all__ = ["copy_sample_voc", "free_port", "mounted", "no_debris", "params", "shutil"]
