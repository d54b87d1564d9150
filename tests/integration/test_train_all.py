"""`segpipe train --all`: every family x seed at once on one real Ray (fractional CPUs, one worker
per run), each its own TorchTrainer and MLflow run (real sqlite store): the runs overlap in time,
their metrics and DVC outputs equal the one-by-one path's for the same seeds, a failing run is
named while the others finish, bad input stops everything before Ray."""

import json
import time

import pytest

from tests.support.cli import assert_user_error, run_cli
from tests.support.paths import ROOT
from tests.support.training import TINY, TRAINED_FAMILIES, TRAINED_SEEDS, tiny_overrides

# one xdist worker runs this module and test_report.py: they read the same session run set
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("trained")]

FAMILIES = ("unet", "lraspp")  # the two lightest tiny models


def overrides(data_dir, work, seeds=(0, 1), epochs=1, extra_family_train=None):
    fams = {f: {"model": TINY[f][0], "options": TINY[f][1]} for f in FAMILIES}
    for f, t in (extra_family_train or {}).items():
        fams[f]["train"] = t
    # one 0.5-CPU worker per run: the 2-CPU test Ray packs 4 runs at once
    return tiny_overrides(data_dir, work, epochs=epochs) + [
        "ray.num_workers=1", "ray.cpus_per_worker=0.5", "train.sample_images=0",
        f"families={json.dumps(fams)}", f"seeds={json.dumps(list(seeds))}"]


def test_all_runs_overlap_and_match_the_sequential_runs(trained_all, synthetic_shards, tmp_path, capsys):
    """The session's `train --all` run set (tests/integration/conftest.py: lraspp and unet x seeds 0
    and 1, all four at once) against the one-by-one path: the runs overlapped,
    and one run of each family trained again alone with the same seed gives the same results (the
    fixed-seed guarantee, across processes, schedules and the two paths)."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_params
    from pipeline.training.job import train

    conc, seq, outcomes, out = trained_all["work"], tmp_path / "seq", trained_all["outcomes"], trained_all["out"]
    assert [(o.family, o.seed, o.error) for o in outcomes] == [(f, s, "") for f in TRAINED_FAMILIES for s in TRAINED_SEEDS]
    for f in TRAINED_FAMILIES:
        for s in TRAINED_SEEDS:
            assert f"[{f}/seed{s}] epoch 2/2" in out and f"[{f}/seed{s}] done: val mIoU" in out
    assert "train --all: 4/4 runs finished" in out

    client = MlflowClient(f"sqlite:///{conc / 'mlflow.db'}")
    runs = [client.get_run(o.summary["mlflow_run_id"]) for o in outcomes]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted((r.data.tags["family"], r.data.tags["seed"], r.data.tags["stage"]) for r in runs) == \
        sorted((f, str(s), "train") for f in TRAINED_FAMILIES for s in TRAINED_SEEDS)
    # concurrent: every run started before any run ended
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs), \
        [(r.info.run_name, r.info.start_time, r.info.end_time) for r in runs]
    for o in outcomes:  # every concurrent run wrote its outputs
        stem = f"{o.family}-seed{o.seed}"
        assert (conc / "models" / f"{stem}.pt").stat().st_size > 0
        assert (conc / "reports" / "metrics" / f"{stem}_epochs.csv").read_text().splitlines()[0].startswith("epoch,")
        assert [m.step for m in client.get_metric_history(o.summary["mlflow_run_id"], "val/mIoU")] == [1, 2]

    # the one-by-one path for one run of each family, each with a seed other than the other's
    # (unet/seed1, lraspp/seed0), same params but the output folders
    ps = load_params(trained_all["params"], [f"train.models_dir={seq / 'models'}", f"train.reports_dir={seq / 'reports'}",
                                              f"ray.storage_path={seq / 'ray'}", f"mlflow.tracking_uri=sqlite:///{seq / 'mlflow.db'}"])
    twins = [o for o in outcomes if (o.family, o.seed) in (("unet", 1), ("lraspp", 0))]
    assert len(twins) == 2
    t0 = time.time()
    alones = [train(ps.model_copy(update={"seed": o.seed}), o.family, progress=False) for o in twins]
    with capsys.disabled():
        print(f"\ntrain --all: 4 runs in {trained_all['seconds']:.0f}s; 2 of them one by one {time.time() - t0:.0f}s")
    for o, alone in zip(twins, alones):
        for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "per_class_iou"):
            assert o.summary[k] == alone[k], (o.name, k)
        # the same DVC outputs as the one-by-one path, same names, same metrics
        stem = f"{o.family}-seed{o.seed}"
        a = json.loads((conc / "reports" / "metrics" / f"{stem}.json").read_text())
        b = json.loads((seq / "reports" / "metrics" / f"{stem}.json").read_text())
        timing = ("mlflow_run_id", "train_seconds", "img_per_s")  # wall-clock figures differ, the results do not
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


def test_a_failing_run_is_named_and_the_others_finish(ray_local, synthetic_shards, tmp_path, capsys):
    """Through the CLI's main() (in-process, on the test Ray): unet's NaN loss fails its run only;
    the exit code is the single path's for a failed training (1), one `error:` line names it.
    2 CPUs per run on the 2-CPU Ray: the two runs do not fit at once, so the second waits for the
    CPUs (Train V2 retries the worker-group start) and still finishes. (How several failures are
    joined into that line, and exit 2 when all were bad input: tests/unit/test_config_cli.py::test_failures_are_summed_up_in_one_error_line.)"""
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main

    ov = overrides(synthetic_shards, tmp_path, seeds=(0,),
                   extra_family_train={"unet": {"lr": 1e30, "max_failures": 0}}) + ["ray.cpus_per_worker=2"]
    rc = main(["train", "--all", "-p", str(ROOT / "params.yaml"), *sum((["-S", o] for o in ov), [])])
    cap = capsys.readouterr()
    assert rc == 1, cap
    errors = [line for line in cap.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: 1 of 2 runs failed: unet/seed0: loss became NaN"), cap.err
    assert "[unet/seed0] failed: loss became NaN" in cap.out and "[lraspp/seed0] done: val mIoU" in cap.out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("segpipe").experiment_id])
    assert sorted((r.data.tags["family"], r.data.tags["seed"], r.info.status) for r in runs) == [
        ("lraspp", "0", "FINISHED"), ("unet", "0", "FAILED")]
    assert (tmp_path / "models" / "lraspp-seed0.pt").exists() and not (tmp_path / "models" / "unet-seed0.pt").exists()


def test_bad_input_stops_train_all_before_ray(synthetic_shards, tmp_path):
    base = sum((["-S", o] for o in overrides(synthetic_shards, tmp_path)), [])
    proc = run_cli("train", "--all", "--family", "unet", "-p", str(ROOT / "params.yaml"), *base, cwd=tmp_path)
    assert_user_error(proc, "--all", "--family")
    # one family that does not build: nothing starts, not even the good family's run
    proc = run_cli("train", "--all", "-p", str(ROOT / "params.yaml"), *base,
                   "-S", "families.unet.options.output_stride=4", cwd=tmp_path, no_ray=True)
    assert_user_error(proc, "output_stride")
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
