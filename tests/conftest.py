import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TAR = ROOT / "assets" / "voc-mini.tar"


class RayStarted(AssertionError):
    """Raised by run_cli(no_ray=True) where the command would have started or joined a Ray."""


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, fresh: bool = False,
            no_ray: bool = False) -> subprocess.CompletedProcess:
    """Run `segpipe ...`, capturing its exit code, stdout and stderr.

    fresh=True: a new process, as a user runs it (for what only a process shows: a timeout, a
    signal, a server that must not start, its memory). Default: the CLI's own entry point
    (pipeline.cli.main, what the `segpipe` script calls) in this process, in `cwd`, with this
    process's environment and working directory restored afterwards; an exception escaping main()
    comes back as exit 1 with its traceback on stderr, as the process would print it. Each fresh
    process pays 4-6 s of imports (torch, torchvision, MLflow, Ray), most of the suite's error-path
    tests' time. no_ray=True (in-process): any attempt to start or join a Ray (pipeline.system.ray_init,
    ray.init) raises RayStarted, which comes back as exit 1 with its traceback: the check for "bad
    input stops everything before Ray", stronger than reading a process's log for Ray's banner."""
    if fresh:
        env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd or ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    import contextlib
    import io
    import traceback

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    env, here = dict(os.environ), os.getcwd()

    def started(*_a, **_k):
        raise RayStarted("the command started (or joined) a Ray")

    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
            if no_ray:
                import ray

                from pipeline import system

                mp.setattr(system, "ray_init", started)
                mp.setattr(ray, "init", started)
            try:
                rc = main(list(args))
            except SystemExit as exc:  # argparse: --help (0), a usage error (2)
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001  (what the process would die with)
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)
    return subprocess.CompletedProcess(["segpipe", *args], rc, out.getvalue(), err.getvalue())


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one `error:` line naming what is wrong, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """A copy of the committed params.yaml in a temp dir (tests never touch the repo's)."""
    dst = tmp_path / "params.yaml"
    dst.write_text((ROOT / "params.yaml").read_text())
    return dst


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path -> its bytes (to show nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def pytest_configure(config):
    """Before any test process starts a Ray: make sure this user's Ray token exists. This Ray turns
    token authentication on by default and writes ~/.ray/auth_token when a head starts without one;
    two pytest-xdist workers starting their Rays at once on a fresh machine would each write their
    own, and one of them would then reject its own clients."""
    # Ray clients in this process read RAY_AUTH_MODE once (Ray's config is initialised on first
    # use and kept): token mode from the start, as every head here runs with token auth (the README
    # tells users to export it), so a cluster test's job client does not depend on which test
    # touched Ray first
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if hasattr(config, "workerinput"):  # an xdist worker: the controller did the token
        _share_the_cores(int(config.workerinput.get("workercount", 1)))
        return
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists():
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()


def _share_the_cores(workers: int) -> None:
    """An xdist worker's own torch work (in-process CLI runs, model tests) gets its share of the
    cores, not all of them: two workers (plus their Rays) on 2 cores, each with 2 OpenMP threads,
    spin-wait for a busy core (measured: a 40-step toy training beside one busy core took 13.6
    CPU-s with 2 threads, 7.3 with 1). Ray Train workers set their own (cpus_per_worker)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (2 CPUs) in this process with its own temp dir, started and stopped as a
    quickstart starts its one Ray (system.shared_local_ray); the environment a `segpipe` child
    process needs to join it is kept for `ray_join_env`."""
    import shutil
    import tempfile

    import ray

    from pipeline.system import shared_local_ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        with shared_local_ray(num_cpus=2, temp_dir=tmp) as env:
            _RAY_JOIN_ENV.update(env)
            yield ray
            _RAY_JOIN_ENV.clear()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_RAY_JOIN_ENV: dict[str, str] = {}


@pytest.fixture
def ray_join_env(ray_local) -> dict[str, str]:
    """Environment variables that make a `segpipe` child process join the session's Ray (instead of
    starting its own: 10-20 s on 2 cores) the way a quickstart's DVC stages join its one Ray."""
    return dict(_RAY_JOIN_ENV)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """Tiny synthetic shards (16 train / 6 val, 64 px), made once per session."""
    from pipeline.config import load_params
    from pipeline.data.sources import fetch
    from pipeline.data.shards import preprocess

    d = tmp_path_factory.mktemp("syn") / "data"
    p = load_params(ROOT / "params.yaml", [f"data.dir={d}", "data.source=synthetic", "data.synthetic.train_count=16",
                                           "data.synthetic.val_count=6", "data.synthetic.size=64", "data.row_group_rows=5"])
    fetch(p, progress=False)
    preprocess(p, progress=False)
    return d


@pytest.fixture(autouse=True, scope="session")
def _segpipe_logging():
    """Stage functions called in-process log through the same handler `segpipe` sets up."""
    from pipeline.cli import setup_logging

    setup_logging()


# --- shared pieces of the reliability tests (issue 15) ---



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
