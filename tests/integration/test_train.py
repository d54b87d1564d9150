"""`segpipe train` with a real Ray (2 CPU workers) and a real sqlite MLflow store, on tiny
synthetic shards: every family trains, MLflow holds what DESIGN.md names, a killed worker is
recovered without a gap or a repeat in the metric history, bad params never start Ray.

Elsewhere: a fixed seed gives identical metrics (test_train_all.py: a run trained again alone
equals its concurrent twin); a NaN loss fails the run, its MLflow run FAILED, the error line named
(test_train_all.py's failing runs; test_distributed.py for the `segpipe train` process and both
ranks)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.config import load_params
from tests.support.cli import assert_user_error, run_cli
from tests.support.paths import ROOT
from tests.support.procs import ActorTitles, train_worker_pids
from tests.support.training import TINY, tiny_overrides

pytestmark = pytest.mark.slow





def test_each_family_trains_and_mlflow_has_it_all(ray_local, synthetic_shards, tmp_path, capsys):
    """The four families at once (`train --all`: each run the one-by-one `train()` in its own driver
    thread), one 0.5-CPU worker each so all four fit the session's 2-CPU Ray together (a 1-worker
    run goes through the same collectives as N; the 2-worker runs are the killed-worker test's and
    test_distributed.py's)."""
    from mlflow.tracking import MlflowClient

    from pipeline.cli import setup_logging
    from pipeline.training.job import train_all
    from pipeline.data.voc import VOC_CLASSES

    p = load_params(ROOT / "params.yaml", tiny_overrides(synthetic_shards, tmp_path) + ["ray.num_workers=1", "ray.cpus_per_worker=0.5",
                                                                                 "seeds=[0]"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    setup_logging()  # progress at INFO (an in-process `-q` run of this worker may have lowered it)
    with ActorTitles() as actors:
        outcomes = train_all(p, progress=True)
    assert [(o.family, o.seed, o.error) for o in outcomes] == [(fam, 0, "") for fam in TINY]
    # what DeepLabV3's ASPP sees at this crop, said before training (64 px, output stride 16: a 4 x 4
    # map, where torchvision's MobileNetV3 rates 12, 24, 36 are 1x1 convs); no such line for the others
    aspp = [line for line in capsys.readouterr().out.splitlines() if "ASPP at a" in line]
    assert aspp == ["[deeplabv3/seed0] ASPP at a 64 px crop, output stride 16: feature map 4 x 4; rate 12: field 400 px = 1x1 "
                    "conv at this crop, rate 24: field 784 px = 1x1 conv at this crop, rate 36: field 1168 px = 1x1 "
                    "conv at this crop; image pooling on"], aspp
    # a local Ray cannot be preempted: no preemption watcher process per run (the sampler saw the runs)
    assert "ray::TrainController" in actors.seen and "ray::RayTrainWorker" in actors.seen, actors.seen
    assert "ray::PreemptionWatcher" not in actors.seen, actors.seen
    # the four concurrent runs share the process's one progress queue actor (made by an earlier
    # run of this process, or by one of these): no queue actor per run (pipeline.training.progress)
    assert "ray::_QueueActor" in actors.seen, actors.seen  # progress=True: the runs report through one
    assert len(actors.pids.get("ray::_QueueActor", ())) <= 1, actors.pids  # none or one new, never one per run
    for o in outcomes:
        fam, summary, model = o.family, o.summary, TINY[o.family][0]
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"{fam}-{model}-0"
        tags = run.data.tags
        assert (tags["family"], tags["model"], tags["seed"], tags["stage"], tags["data_source"]) == (fam, model, "0", "train", "synthetic")
        assert len(tags["git_commit"]) >= 7
        params = run.data.params
        assert params["train.epochs"] == "1" and params["model"] == model and params["ray.num_workers"] == "1"
        metrics = run.data.metrics
        for name in ("train/loss", "train/lr", "train/img_per_s", "val/mIoU", "val/pixel_acc", "val/mean_acc", "val/fwIoU",
                     "val/iou/background"):
            assert name in metrics, name
        assert all(k[len("val/iou/"):] in VOC_CLASSES for k in metrics if k.startswith("val/iou/"))
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU")] == [1]
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.png", "confusion_matrix.csv", "predictions.png", f"{fam}-seed0_epochs.csv"} <= arts
        models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run.info.run_id}'")
        assert len(models) == 1 and models[0].status == "READY"
        # DVC outputs
        out = json.loads((tmp_path / "reports" / "metrics" / f"{fam}-seed0.json").read_text())
        assert out["mIoU"] == pytest.approx(metrics["val/mIoU"])
        # the DVC metric: a few numbers (one `dvc exp show` column each); ids and per-class IoU beside it
        assert set(out) == {"mIoU", "pixel_acc", "mean_acc", "img_per_s", "train_seconds"}
        assert all(isinstance(v, (int, float)) for v in out.values())
        detail = json.loads((tmp_path / "reports" / "metrics" / f"{fam}-seed0_detail.json").read_text())
        assert detail["mlflow_run_id"] == run.info.run_id and detail["model"] == model
        assert detail["per_class_iou"]["background"] == pytest.approx(metrics["val/iou/background"])
        assert (tmp_path / "models" / f"{fam}-seed0.pt").stat().st_size > 0
        csv_lines = (tmp_path / "reports" / "metrics" / f"{fam}-seed0_epochs.csv").read_text().splitlines()
        assert csv_lines[0].startswith("epoch,train_loss") and len(csv_lines) == 2


def test_bad_params_never_start_ray(tmp_path, synthetic_shards):
    base = tiny_overrides(synthetic_shards, tmp_path)
    for extra, needle in ((["train.model=resnet9000"], "unknown model"),
                          (["train.model=deeplabv3_resnet50", "train.model_options.atrous_rates=[6, 12]"], "atrous_rates"),
                          (["train.model=unet", "train.model_options.output_stride=4"], "output_stride"),
                          ([f"data.dir={tmp_path / 'empty'}"], "segpipe preprocess")):
        proc = run_cli("train", "-p", str(ROOT / "params.yaml"), *sum((["-S", o] for o in base + extra), []), cwd=tmp_path, no_ray=True)
        assert_user_error(proc, needle)
    proc = run_cli("train", "-p", str(ROOT / "params.yaml"), "--family", "segformer", *sum((["-S", o] for o in base), []),
                   cwd=tmp_path, no_ray=True)
    assert_user_error(proc, "unknown family")
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_killed_worker_is_restored_without_gap_or_repeat(synthetic_shards, tmp_path, ray_join_env):
    """SIGKILL one Ray Train worker mid-run: FailureConfig restarts the group from the last
    checkpoint; every epoch is logged exactly once and the run FINISHES. `segpipe train` runs in
    its own process and joins the session's Ray, as a quickstart stage does."""
    from mlflow.tracking import MlflowClient

    epochs = 4
    args = sum((["-S", o] for o in tiny_overrides(synthetic_shards, tmp_path, epochs=epochs)
                + ["train.max_failures=2", "train.sample_images=0"]), [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **ray_join_env}
    log = tmp_path / "train.log"  # a file, not a pipe: nobody reads while the test polls
    started = time.time() - 1
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "-p", str(ROOT / "params.yaml"), "--family", "unet",
                             "--seed", "1",  # the DVC train@ stage's form
                             *args], cwd=tmp_path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    seen: set[int] = set()  # every Ray Train worker process the run had
    try:
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        run_id, victim = None, None
        deadline = time.time() + 240
        while time.time() < deadline and victim is None:
            time.sleep(0.5)
            seen |= train_worker_pids(started)
            if run_id is None and (tmp_path / "mlflow.db").exists():
                try:
                    exp = client.get_experiment_by_name("segpipe")
                    runs = client.search_runs([exp.experiment_id]) if exp else []
                    run_id = runs[0].info.run_id if runs else None
                except Exception:
                    continue
            if run_id and len(client.get_metric_history(run_id, "val/mIoU")) >= 1:
                alive = sorted(train_worker_pids(started))
                if alive:
                    victim = alive[-1]
                    os.kill(victim, signal.SIGKILL)
        assert victim is not None, "the run never reached its first epoch"
        while proc.poll() is None and time.time() < deadline + 400:  # the restarted group's workers
            seen |= train_worker_pids(started)
            time.sleep(0.5)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out
    assert len(seen - {victim}) >= 2, f"no worker was restarted: {seen}"  # 2 workers: a third process replaced the victim
    steps = [m.step for m in client.get_metric_history(run_id, "val/mIoU")]
    assert steps == list(range(1, epochs + 1)), steps
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["seed"] == "1"
    assert (tmp_path / "reports" / "metrics" / "unet-seed1.json").exists()
    assert out.count(f"epoch {epochs}/{epochs}") == 1
    # the DVC epoch CSV comes from what the run returned (the history travels in its checkpoints):
    # every epoch, those before the kill included, with the values MLflow got
    import csv

    rows = list(csv.DictReader((tmp_path / "reports" / "metrics" / "unet-seed1_epochs.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1)), rows
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val/mIoU")}
    assert [float(r["val_mIoU"]) for r in rows] == pytest.approx([logged[e] for e in range(1, epochs + 1)])
