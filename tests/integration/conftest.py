"""The run set two modules read: test_train_all (the runs overlap, and equal the one-by-one path's)
and test_report (report, UI and predict on real runs). Trained once per session, and both modules
are one xdist group ("trained") so one pytest-xdist worker trains it once for both. Its families,
seeds and epochs: tests/support/training.py."""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import pytest
import yaml

from pipeline.config import apply_overrides, read_yaml
from tests.support.paths import ROOT
from tests.support.training import TRAINED_EPOCHS, TRAINED_FAMILIES, TRAINED_SEEDS, tiny_overrides


@pytest.fixture(scope="session")
def trained_all(ray_local, synthetic_shards, tmp_path_factory) -> dict:
    """`segpipe train --all` (its stage entry point, pipeline.stages.train.run_all) of lraspp and
    unet x seeds 0 and 1, 2 epochs, the four runs at once on the session's Ray (one 0.5-CPU worker
    each: 2 CPUs for all four; a 1-worker run goes through the same collectives as N, and the
    2-worker runs are test_distributed.py's and test_train.py's), into a real sqlite store under a
    params file written for them. Returns work dir, params file, the run outcomes, the printed output, the seconds taken."""
    from pipeline.config import load_params
    from pipeline.stages.train import run_all
    from pipeline.training import job

    work = tmp_path_factory.mktemp("trained")
    raw = apply_overrides(read_yaml(ROOT / "params.yaml"), tiny_overrides(synthetic_shards, work, epochs=TRAINED_EPOCHS) + [
        "train.sample_images=0", f"seeds={list(TRAINED_SEEDS)}", "ray.num_workers=1", "ray.cpus_per_worker=0.5",
        "report.latency_repeats=3", "report.latency_warmup=1", "report.sample_images=2"])
    raw["families"] = {f: raw["families"][f] for f in TRAINED_FAMILIES}
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    outcomes = []
    train_all = job.train_all

    def keep(*args, **kwargs):  # the stage prints a summary; the tests want the outcomes too
        outcomes.extend(train_all(*args, **kwargs))
        return outcomes

    out = io.StringIO()
    t0 = time.time()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(job, "train_all", keep)
        rc = run_all(load_params(params), argparse.Namespace(all=True, family=None, seed=None, quiet=False))
    assert rc == 0, out.getvalue()[-3000:]
    return {"work": work, "params": params, "outcomes": outcomes, "out": out.getvalue(), "seconds": time.time() - t0}
