"""Processes and ports: a free port, waiting for a server to answer, stopping a process tree by
PID (never by name), the environment a `segpipe` / `ray` child needs, and the Ray actor processes
a run starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.paths import BIN


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    """Until url answers (any HTTP status); RuntimeError with the log's tail if proc exits first
    or timeout passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (e.g. 401 while token auth is on): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the process and every descendant, by PID; SIGKILL what is left after 10 s."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def tool_env() -> dict:
    """This environment with the virtualenv's bin/ first on PATH (segpipe, ray), for a Ray head,
    node or job client started as a process."""
    # this Ray turns token authentication on by default: the head and every client then need
    # RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token)
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
                PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token")


class ActorTitles:
    """The `ray::<Actor>` process titles seen below this process while the block runs (sampled
    every 0.2 s; `with ActorTitles() as actors`): `actors.seen`, which Ray actors a local run
    started; `actors.pids[title]`, the processes of that title started after the block began."""

    def __enter__(self):
        import threading

        self.seen: set[str] = set()
        self.pids: dict[str, set[int]] = {}
        self._since = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        import psutil

        while not self._stop.is_set():
            for child in psutil.Process().children(recursive=True):
                try:
                    title = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if title.startswith("ray::"):
                    name = title.split()[0].split(".")[0]
                    self.seen.add(name)
                    try:
                        if child.create_time() >= self._since - 1:
                            self.pids.setdefault(name, set()).add(child.pid)
                    except psutil.Error:
                        pass
            self._stop.wait(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def train_worker_pids(since: float) -> set[int]:
    """The Ray Train worker processes (actor RayTrainWorker) of the session's Ray (it runs below this
    pytest process) started since `since`: the ones of the `segpipe train` under test."""
    import psutil

    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.create_time() >= since and "RayTrainWorker" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.Error:
            pass
    return pids


class OwnRay:
    """A local Ray head of its own (`ray start --head --block` as a child process, its own temp dir
    and ports, 2 CPUs, bound to 127.0.0.1), for tests that kill the drivers joined to it: whatever a
    killed driver leaves behind stays in this Ray, not in the xdist worker's shared one. `env` makes
    a `segpipe` child join it as a quickstart stage joins the quickstart's Ray; stopped by PID."""

    def __init__(self, tmp: Path):
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = tmp / "ray-head.log"
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}", "--num-cpus=2",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={self.temp_dir}"],
            env=tool_env(), stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.env = {"RAY_ADDRESS": self.address, "SEGPIPE_SHARED_RAY": self.address, "RAY_AUTH_MODE": "token",
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
        deadline = time.time() + 120
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"ray start --head did not come up:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        import shutil

        stop_tree(self.proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
