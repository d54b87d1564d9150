"""A run ends as it ended, and a run that cannot fit never starts waiting.

- SIGINT (Ctrl-C) and SIGTERM to `segpipe train` (a real process joined to a Ray of this module's
  own, as a quickstart stage joins the quickstart's: a killed driver's leftovers never reach the xdist
  worker's shared Ray) once its first epoch is logged: exit 130 / 143, one `error: interrupted
  (SIG...)` line, no traceback, the MLflow run KILLED (not FAILED), its Ray Train workers gone;
- workers that can never be placed on the local Ray (ray.num_workers 3 x 1 CPU on 2 CPUs): one
  `error:` line naming the knobs before any MLflow run or Ray wait;
- a train.models_dir without room for the model file: refused before the first epoch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.support.cli import assert_user_error, run_cli
from tests.support.files import mounted
from tests.support.paths import ROOT
from tests.support.procs import OwnRay, train_worker_pids
from tests.support.training import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("interrupts")]


@pytest.fixture(scope="module")
def own_ray(tmp_path_factory):
    """The join environment of a Ray head of this module's own (tests.support.procs.OwnRay)."""
    head = OwnRay(tmp_path_factory.mktemp("own_ray"))
    try:
        yield head.env
    finally:
        head.stop()


START_WITH_CTRL_C = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                     "sys.argv = ['segpipe', *sys.argv[1:]]; runpy.run_module('pipeline.cli', run_name='__main__')")


def _start_train(tmp_path, env: dict, *args: str) -> subprocess.Popen:
    """`segpipe train ...` as a real process (stderr kept in tmp_path/err: proc.err_path), with Ctrl-C
    at its default as in a terminal: a process started in the background by a non-interactive shell
    (a CI runner's `cmd &`) inherits SIGINT ignored, and Python then leaves it ignored."""
    proc = subprocess.Popen([sys.executable, "-c", START_WITH_CTRL_C, "train", "-p", str(ROOT / "params.yaml"), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err", "w"),
                            text=True)
    proc.err_path = tmp_path / "err"
    return proc


def _wait_first_epoch(client, proc: subprocess.Popen, n_runs: int = 1) -> list:
    """The runs of the experiment once each has logged an epoch (while the process still runs)."""
    deadline, runs = time.time() + 240, []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            exp = client.get_experiment_by_name("segpipe")
            runs = client.search_runs([exp.experiment_id]) if exp else []
        except Exception:
            continue
        if len(runs) == n_runs and all(client.get_metric_history(r.info.run_id, "train/loss") for r in runs):
            return runs
    raise AssertionError(f"the run never reached its first epoch: {(proc.poll(), runs)}\n"
                         f"{proc.err_path.read_text()[-3000:]}")


@pytest.mark.parametrize("sig,code,what", [(signal.SIGINT, 130, ["--family", "unet"]),
                                           (signal.SIGTERM, 143, ["--family", "unet"]),
                                           (signal.SIGTERM, 143, ["--all"])], ids=["SIGINT", "SIGTERM", "all-SIGTERM"])
def test_a_signal_ends_the_run_killed_with_one_line(synthetic_shards, tmp_path, own_ray, sig, code, what):
    """train --all: two runs (unet, seeds 0 and 1) in driver threads, both ended KILLED."""
    from mlflow.tracking import MlflowClient

    extra = ['families={"unet": {"model": "unet", "options": {"base_channels": 8}}}', "seeds=[0, 1]",
             "ray.num_workers=1"] if what == ["--all"] else []
    # 1000 epochs: on a loaded machine the run must still be going when the signal comes (ended, not finished)
    args = sum((["-S", o] for o in tiny_overrides(synthetic_shards, tmp_path, epochs=1000)
                + ["train.sample_images=0", *extra]), [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **own_ray}
    started = time.time() - 1
    proc = _start_train(tmp_path, env, *what, *args)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        runs = _wait_first_epoch(client, proc, 2 if what == ["--all"] else 1)
        workers = train_worker_pids(started)
        assert workers
        proc.send_signal(sig)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "err").read_text()
    assert proc.returncode == code, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: interrupted ({sig.name})"], err
    assert "Traceback" not in err, err
    exp = client.get_experiment_by_name("segpipe")
    assert [r.info.status for r in client.search_runs([exp.experiment_id])] == ["KILLED"] * len(runs)
    deadline = time.time() + 30  # the workers belonged to the driver's Ray job: they go with it
    while time.time() < deadline and [p for p in workers if psutil.pid_exists(p)]:
        time.sleep(0.5)
    assert not [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_workers_that_cannot_fit_the_local_ray_are_refused_before_it_waits(synthetic_shards, tmp_path):
    overrides = tiny_overrides(synthetic_shards, tmp_path) + ["ray.num_workers=3", "ray.cpus_per_worker=1"]
    started = time.time()
    proc = run_cli("train", "-q", "-p", str(ROOT / "params.yaml"), "--family", "unet",
                   *sum((["-S", o] for o in overrides), []), fresh=True, timeout=120)
    assert_user_error(proc, "3 CPUs", "ray.num_workers", "ray.cpus_per_worker")
    assert time.time() - started < 60
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def test_a_models_dir_without_room_is_refused_before_training(synthetic_shards, tmp_path):
    with mounted("tmpfs", tmp_path / "m", size="1m") as m:
        overrides = tiny_overrides(synthetic_shards, tmp_path) + [
            f"train.models_dir={m}", "families.unet.options={base_channels: 64}"]  # ~31 M weights: ~124 MB
        proc = run_cli("train", "-q", "-p", str(ROOT / "params.yaml"), "--family", "unet",
                       *sum((["-S", o] for o in overrides), []), no_ray=True)
        assert_user_error(proc, str(m), "MB free", "train.models_dir")
        assert [p.name for p in m.iterdir()] == []  # the probe is gone


def test_runs_started_in_the_same_second_get_their_own_run_directory(synthetic_shards, tmp_path):
    """Two `segpipe train` of one family and seed at once: a Ray run directory each (checkpoints,
    segpipe_run.json); a resume still finds the latest."""
    from pipeline.config import load_params
    from pipeline.training.job import ray_run_name, resolve_job

    p = load_params(ROOT / "params.yaml", tiny_overrides(synthetic_shards, tmp_path))
    job = resolve_job(p, "unet")
    names = [ray_run_name(job, str(tmp_path / "ray")) for _ in range(20)]
    assert len(set(names)) == 20 and all(n.startswith("unet-unet-seed0-") for n in names), names
    for n in sorted(names):
        (tmp_path / "ray" / n).mkdir(parents=True)
    resumed = resolve_job(load_params(ROOT / "params.yaml", tiny_overrides(synthetic_shards, tmp_path)
                                      + ["train.resume=true"]), "unet")
    assert ray_run_name(resumed, str(tmp_path / "ray")) == sorted(names)[-1]


def test_a_store_locked_mid_run_ends_it_failed_with_one_line(synthetic_shards, tmp_path, own_ray):
    """Another process locks the sqlite store after the first epoch (an open sqlite3 shell) and lets
    go 45 s later: the run stops with one `error:` line naming the store (no traceback); it ends
    FAILED if the store answered by then, else the line names the run it leaves RUNNING."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    args = sum((["-S", o] for o in tiny_overrides(synthetic_shards, tmp_path, epochs=30)
                + ["train.sample_images=0", "ray.num_workers=1"]), [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **own_ray}
    proc = _start_train(tmp_path, env, "--family", "unet", *args)
    client = MlflowClient(f"sqlite:///{db}")
    holder = None
    try:
        runs = _wait_first_epoch(client, proc)
        run_id = runs[0].info.run_id
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, time\n"
            f"con = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
            "con.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(45)\n")], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        proc.wait(timeout=300)
    finally:
        for p in (proc, holder):
            if p is not None and p.poll() is None:
                p.kill()
    err = (tmp_path / "err").read_text()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert proc.returncode in (1, 2) and len(errors) == 1, err
    assert "Traceback" not in err, err
    assert str(db) in errors[0] and "(mlflow.tracking_uri)" in errors[0], errors
    holder.wait(timeout=60)
    status = client.get_run(run_id).info.status
    assert status == "FAILED" or run_id in errors[0], (status, errors)
