"""The distributed step at world size 2 (issue 13), real Ray, gloo on CPU: a val split smaller
than the world size (one rank has no val batch) finishes; a NaN loss on one rank stops both ranks
at the same step with the `error:` line. The collective helper at world size 1 (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT
from tests.support.training import tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_val_image(tmp_path_factory) -> Path:
    from pipeline.config import load_params
    from pipeline.data.sources import fetch
    from pipeline.data.shards import preprocess

    d = tmp_path_factory.mktemp("oneval") / "data"
    p = load_params(ROOT / "params.yaml", [f"data.dir={d}", "data.source=synthetic", "data.synthetic.train_count=8",
                                           "data.synthetic.val_count=1", "data.synthetic.size=64"])
    fetch(p, progress=False)
    preprocess(p, progress=False)
    return d


def _train(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """`segpipe train` in a fresh process (joining the session's Ray when env says so, as a
    quickstart stage does); on a hang (the failure these tests look for) its whole tree is stopped
    by PID before the test fails."""
    from tests.support.procs import stop_tree

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "-p", str(ROOT / "params.yaml"), "--family", "unet",
           *sum((["-S", o] for o in args), [])]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        raise AssertionError(f"segpipe train did not finish within {timeout}s (a rank hung)") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_workers_with_a_one_image_val_split_finish(one_val_image, tmp_path, ray_join_env):
    proc = _train(tiny_overrides(one_val_image, tmp_path) + ["train.sample_images=0", "train.max_failures=2"], tmp_path,
                  env=ray_join_env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[unet] done: val mIoU" in proc.stdout
    s = json.loads((tmp_path / "reports" / "metrics" / "unet-seed0.json").read_text())
    assert 0.0 <= s["pixel_acc"] <= 1.0  # the one image of rank 0 was evaluated and reduced with rank 1's zeros


# Test-side fault injection, put on the workers' PYTHONPATH as sitecustomize.py (product code knows
# nothing of it): once pipeline.training.engine is imported, the loss on the rank named in nan.json
# beside it is NaN, and each rank's NonFiniteLoss stop is recorded as <stops>/nan-<rank>-<epoch>-<step>-<pid>
# (a worker group Ray restarted would add files of new pids).
# A file, not environment variables: the workers of the session's Ray get the job's PYTHONPATH only.
NAN_HOOK = """
import importlib.abc, importlib.machinery, json, os, sys
from pathlib import Path

CONF = json.loads(Path(__file__).with_name("nan.json").read_text())


def _rank():
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else None


def _patch(engine):
    loss_fn, train_epoch = engine.loss_fn, engine.train_epoch

    def nan_loss(outputs, target, aux_weight):
        loss = loss_fn(outputs, target, aux_weight)
        return loss * float("nan") if _rank() == CONF["rank"] else loss

    def recorded_epoch(*args, **kwargs):
        try:
            return train_epoch(*args, **kwargs)
        except engine.NonFiniteLoss as exc:
            Path(CONF["stops"], f"nan-{_rank()}-{exc.epoch}-{exc.step}-{os.getpid()}").touch()
            raise

    engine.loss_fn, engine.train_epoch = nan_loss, recorded_epoch


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipeline.training.engine":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
"""


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(synthetic_shards, tmp_path, ray_join_env):
    """...and once: a NaN is deterministic, so the run ends at once although train.max_failures
    allows two restarts of the worker group (which would replay it from the last checkpoint)."""
    stops, hook = tmp_path / "stops", tmp_path / "hook"
    stops.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NAN_HOOK)
    (hook / "nan.json").write_text(json.dumps({"rank": 1, "stops": str(stops)}))
    proc = _train(tiny_overrides(synthetic_shards, tmp_path) + ["train.sample_images=0", "train.max_failures=2"], tmp_path,
                  env={**ray_join_env, "PYTHONPATH": f"{ROOT}{os.pathsep}{hook}"}, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "loss became NaN at epoch 1 step 0" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # rank 0 (finite loss) stopped too, and no restarted worker group ran into it again
    assert sorted(f.name.rsplit("-", 1)[0] for f in stops.iterdir()) == ["nan-0-1-0", "nan-1-1-0"]


def test_collective_helper_at_world_size_one():
    """Outside Ray, the helper makes a 1-process gloo group and goes through the same call."""
    code = ("import torch; from pipeline.training import dist as d; import torch.distributed as td\n"
            "t = torch.arange(4, dtype=torch.int64)\n"
            "r = d.all_reduce(t, torch.device('cpu'))\n"
            "assert td.is_initialized() and td.get_world_size() == 1 and torch.equal(r, t) and r is not t\n"
            "assert d.any_rank(True, torch.device('cpu')) and not d.any_rank(False, torch.device('cpu'))\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
