"""Helpers shared by the test folders: tiny model settings for CPU training runs, and the
process / HTTP helpers the Ray-head and MLflow-server tests use (stopped by PID, never by name)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pathlib import Path

from tests.conftest import ROOT  # noqa: F401  (re-exported for the test modules)

BIN = Path(sys.executable).parent


TINY = {  # light members of each family, so CPU tests stay fast
    "fcn": ("fcn32s_vgg16", {"upsample": "bilinear"}),
    "deeplabv3": ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}),
    "lraspp": ("lraspp_mobilenet_v3_large", {}),
    "unet": ("unet", {"base_channels": 8, "upsample": "transposed"}),
}


def tiny_overrides(data_dir: Path, work: Path, epochs: int = 1) -> list[str]:
    out = [f"data.dir={data_dir}", "data.source=synthetic", f"train.epochs={epochs}", "train.batch_size=4",
           "train.crop_size=64", "train.eval_size=64", "train.loader_workers=0", "train.sample_images=2",
           "train.bn_momentum=0.1", "ray.num_workers=2", "ray.cpus_per_worker=0.5",
           f"ray.storage_path={work / 'ray'}", f"train.models_dir={work / 'models'}",
           f"train.reports_dir={work / 'reports'}", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}"]
    for fam, (model, opts) in TINY.items():
        out.append(f"families.{fam}.model={model}")
        out.append(f"families.{fam}.options={json.dumps(opts)}")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
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


def _stop_tree(proc: subprocess.Popen) -> None:
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


def _env() -> dict:
    # this Ray turns token authentication on by default: the head and every client then need
    # RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token)
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
                PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token")


def _rest(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


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
