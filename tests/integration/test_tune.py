"""`segpipe tune` with a real Ray, a real sqlite MLflow store and tiny synthetic shards.

One UNet tune in two phases: the optimiser phase (lr grid of 2, ASHA grace 1) and the architecture
phase (upsample bilinear / transposed, the configured transposed included, x 2 seeds, never stopped),
2 epochs per trial. It is interrupted with SIGINT (Ctrl-C) once the store shows its first trial
finished and resumed with tune.resume=true; the tests then check the resume, the MLflow parent/child
structure, ASHA's early stop in the optimiser phase only, the architecture phase at the optimiser
phase's lr with every seed, the ablation table, the reports and `--apply`. The bad-space tests never
start Ray."""

import json
import os
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load_params
from tests.support.cli import assert_user_error, run_cli
from tests.support.paths import ROOT
from tests.support.training import tiny_overrides

# one xdist worker runs the whole module (`make test` runs pytest -n 2 --dist loadgroup): its
# module-scoped fixture is made once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tune")]

METHODS = ["bilinear", "transposed"]
LRS = [0.02, 0.1]


def tune_overrides(data_dir: Path, work: Path) -> list[str]:
    return tiny_overrides(data_dir, work) + [
        "families.unet.model=unet", "families.unet.options={base_channels: 8, upsample: transposed}",
        "train.lr=0.05", "tune.families=[unet]",
        f"tune.space.unet={{upsample: {{grid: [{', '.join(METHODS)}]}}, lr: {{grid: {LRS}}}}}",
        "tune.max_epochs=2", "tune.grace_period=1", "tune.reduction_factor=2", "tune.num_workers=1", "tune.seeds=2",
        "tune.num_samples=1", "tune.cpus_per_worker=0.9", "tune.max_concurrent_trials=2",
    ]


def _args(overrides: list[str]) -> list[str]:
    return ["-p", str(ROOT / "params.yaml"), *sum((["-S", o] for o in overrides), [])]


@pytest.fixture(scope="module")
def tuned(ray_local, synthetic_shards, tmp_path_factory):
    """Run the tune in this process (the session's Ray), Ctrl-C it (SIGINT to this process, caught
    by Tune's handler) as soon as the store shows a first trial of the architecture phase finished
    (the optimiser phase has ended: the resume must restore it, not run it again), resume it with
    tune.resume=true; return what the tests need."""
    from pipeline.tuning.runner import TuneInterrupted, tune_family
    from pipeline.tuning.space import resolve_space

    work = tmp_path_factory.mktemp("tune")
    overrides = tune_overrides(synthetic_shards, work)
    p = load_params(ROOT / "params.yaml", overrides)
    space = resolve_space(p, "unet")
    state = {"interrupted_at": None, "ended_before": []}
    stop = threading.Event()

    def ctrl_c_after_first_trial():
        """Watches the store from outside, as a user watches the UI: the first architecture trial run
        FINISHED -> SIGINT to this process (Python runs the handler, Tune's, in the main thread: Tuner.fit)."""
        from mlflow.tracking import MlflowClient

        c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        while not stop.wait(0.5):
            exp = c.get_experiment_by_name("segpipe")
            done = [] if exp is None else c.search_runs(
                [exp.experiment_id], "tags.stage = 'tune-trial' and attributes.status = 'FINISHED'")
            if any(r.data.tags.get("tune.phase") == "architecture" for r in done):
                state["ended_before"] = [r.data.tags["trial_id"] for r in done]
                state["interrupted_at"] = time.time()
                os.kill(os.getpid(), signal.SIGINT)
                return

    env = dict(os.environ)  # tune_family sets a few Ray variables for its process: not for later tests
    watcher = threading.Thread(target=ctrl_c_after_first_trial, daemon=True)
    try:
        watcher.start()
        try:
            with pytest.raises(TuneInterrupted) as interrupted:
                tune_family(p, space)
        finally:
            stop.set()
            watcher.join(timeout=10)
        assert state["interrupted_at"] is not None
        ended_before = list(state["ended_before"])
        resumed_at = time.time()
        p2 = load_params(ROOT / "params.yaml", overrides + ["tune.resume=true"])
        summary = tune_family(p2, resolve_space(p2, "unet"))
    finally:
        os.environ.clear()
        os.environ.update(env)
    return {"work": work, "overrides": overrides, "interrupted": interrupted.value, "summary": summary,
            "interrupted_at": state["interrupted_at"], "resumed_at": resumed_at, "ended_before": ended_before}


def _mlflow(work: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = c.get_experiment_by_name("segpipe")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    return c, [r for r in runs if r.data.tags.get("stage") == "tune"], [r for r in runs if r.data.tags.get("stage") == "tune-trial"]


def _phase(runs, phase):
    return [r for r in runs if r.data.tags.get("tune.phase") == phase]


def test_interrupted_tune_resumes_without_rerunning_finished_trials(tuned):
    err = tuned["interrupted"]
    assert err.exit_code == 130 and "tune of unet interrupted" in str(err) and "tune.resume=true" in str(err)
    assert tuned["summary"]["trials"] == 6
    c, parents, children = _mlflow(tuned["work"])
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the resume continued the same parent run
    assert len(children) == 6, [r.data.tags for r in children]  # one per trial, none created twice
    assert (len(_phase(children, "optimiser")), len(_phase(children, "architecture"))) == (2, 4)
    before = [r for r in children if r.data.tags["trial_id"] in tuned["ended_before"]]
    assert len(_phase(before, "optimiser")) == 2, "the optimiser phase had not ended before the interruption"
    assert _phase(before, "architecture"), "no architecture trial had ended before the interruption"
    assert len(before) < 6, "every trial had ended: nothing was left to resume"
    for r in before:  # a trial that ended before Ctrl-C trained no epoch after the resume (one whose end
        # Tune had not yet processed when Ctrl-C came is restored at its final checkpoint: it trains nothing)
        hist = c.get_metric_history(r.info.run_id, "val/mIoU")
        assert hist and all(m.timestamp / 1000 < tuned["resumed_at"] for m in hist), r.data.tags
    for r in children:  # resumed trials continue their history: every epoch exactly once
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "val/mIoU")]
        assert steps == list(range(1, len(steps) + 1)) and steps, (r.data.tags, steps)


def test_mlflow_parent_child_runs_and_asha_early_stop(tuned):
    c, parents, children = _mlflow(tuned["work"])
    parent = parents[0]
    assert parent.data.tags["family"] == "unet" and parent.data.tags["ray_experiment"].startswith("tune-unet-")
    for r in children:
        tags, params = r.data.tags, r.data.params
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["stage"], tags["family"], tags["model"]) == ("tune-trial", "unet", "unet")
        assert r.info.status == "FINISHED"
        assert params["train.epochs"] == "2" and params["model_options.base_channels"] == "8"
        assert tags["early_stopped"] == str(tags["tune.status"] == "early_stopped").lower()
        assert r.data.metrics["model/params"] > 0 and r.data.metrics["model/gflops"] > 0
    opt, arch = _phase(children, "optimiser"), _phase(children, "architecture")
    # the optimiser phase: the lr grid on the configured architecture (transposed), one seed
    assert sorted(float(r.data.params["hp.lr"]) for r in opt) == LRS
    assert {r.data.params["model_options.upsample"] for r in opt} == {"transposed"}
    assert {r.data.params["tune.seed"] for r in opt} == {"0"}
    # ASHA's rule replayed in the order the trials reached the first rung (grace 1, factor 2): a
    # trial stops there when its val mIoU is below the median of the values recorded before it.
    # Two arrivals within 2 s may have reached the scheduler in either order: not judged.
    import numpy as np

    arrivals = sorted(((next(m for m in c.get_metric_history(r.info.run_id, "val/mIoU") if m.step == 1), r)
                       for r in opt), key=lambda a: a[0].timestamp)
    seen: list[float] = []
    for i, (m, r) in enumerate(arrivals):
        cutoff = float(np.nanpercentile(seen, 50)) if seen else None
        expect = "early_stopped" if cutoff is not None and m.value < cutoff else "completed"
        close = any(abs(m.timestamp - o.timestamp) < 2000 for j, (o, _) in enumerate(arrivals) if j != i)
        if not close:
            assert r.data.tags["tune.status"] == expect, (r.data.params["hp.lr"], m.value, seen)
        seen.append(m.value)
    for r in [r for r in opt if r.data.tags["tune.status"] == "early_stopped"]:
        assert r.data.tags["tune.asha_stopped_at"] == "1"
    # the architecture phase: every method x seed, at the optimiser phase's best lr, never stopped
    done_opt = [r for r in opt if r.data.tags["tune.status"] == "completed"]
    best_lr = max(done_opt, key=lambda r: r.data.metrics["val/mIoU"]).data.params["hp.lr"]
    assert sorted((r.data.params["hp.upsample"], r.data.params["tune.seed"]) for r in arch) == [
        (m, s) for m in sorted(METHODS) for s in ("0", "1")]
    assert {float(r.data.params["train.lr"]) for r in arch} == {float(best_lr)}
    for r in arch:
        assert r.data.tags["tune.status"] == "completed" and "tune.asha_stopped_at" not in r.data.tags
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val/mIoU")] == [1, 2]
    # the parent: the adopted point's mean over the seeds, the ablation table, every trial in a CSV, the plots
    table = json.loads(parent.data.tags["ablation"])
    means = {m: statistics.fmean(r.data.metrics["val/mIoU"] for r in arch if r.data.params["hp.upsample"] == m)
             for m in METHODS}
    rows = {r["value"]: r for r in table["axes"]["upsample"]}
    assert rows["transposed"]["configured"] and rows["bilinear"]["mean"] == pytest.approx(means["bilinear"])
    assert rows["bilinear"]["delta"] == pytest.approx(means["bilinear"] - means["transposed"])
    chosen = table["chosen"]["upsample"]
    assert chosen == ("bilinear" if rows["bilinear"]["verdict"] == "better beyond the seed spread" else "transposed")
    assert parent.data.metrics["best/val_mIoU"] == pytest.approx(means[chosen])
    assert parent.data.params["best.lr"] == best_lr
    assert ("best.upsample" in parent.data.params) == (chosen != "transposed")
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_params.yaml", "best_config.json", "metrics.json", "ablation.json", "ablation.md",
            "plots"} <= arts, arts
    plots = {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/miou_vs_upsample.png", "plots/miou_by_upsample.png", "plots/miou_vs_lr.png",
            "plots/ablation.png"} <= plots, plots
    csv_path = c.download_artifacts(parent.info.run_id, "trials.csv", str(tuned["work"] / "dl"))
    lines = Path(csv_path).read_text().splitlines()
    assert lines[0].startswith("phase,seed,trial,trial_id,status,epochs,stopped_at,val_mIoU") and len(lines) == 7


def test_reports_best_params_and_apply(tuned):
    work = tuned["work"]
    out = work / "reports" / "tune" / "unet"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["trials"], metrics["completed"] + metrics["early_stopped"], metrics["errored"]) == (6, 6, 0)
    best = json.loads((out / "best_config.json").read_text())
    assert metrics["best_val_mIoU"] == pytest.approx(best["val_mIoU"])
    assert metrics["best_val_mIoU_std"] == pytest.approx(best["val_mIoU_std"]) and best["val_mIoU_std"] >= 0
    # what --apply takes: the optimiser phase's lr, and upsample only when it beat transposed beyond the spread
    assert best["values"]["lr"] in LRS and best["train"]["lr"] == best["values"]["lr"]
    adopted = best["options"]["upsample"] != "transposed"
    assert ("upsample" in best["values"]) == adopted
    assert any(n.startswith("upsample: ") for n in best["notes"]), best["notes"]
    table = json.loads((out / "ablation.json").read_text())
    assert [r["value"] for r in table["axes"]["upsample"]] == ["bilinear", "transposed"]
    assert "| transposed (configured) | 2 |" in (out / "ablation.md").read_text()
    # the DVC metric holds numbers only (one `dvc exp show` column each); names and ids are in best_config
    assert all(isinstance(v, (int, float)) for v in metrics.values()) and "best_epochs" in metrics, metrics
    assert best["ray_experiment"].startswith("tune-unet-") and len(best["mlflow_parent_run_id"]) == 32
    assert best["model"] == "unet" and best["options"]["upsample"] in METHODS
    # best_params.yaml is a params file `segpipe train -p` takes as it is
    p = load_params(out / "best_params.yaml")
    assert p.families["unet"].model == "unet" and p.families["unet"].options == best["options"]
    assert p.train.epochs == 1 and not p.tune.resume  # the training schedule, not the trials'
    from pipeline.training.job import resolve_job

    assert resolve_job(p, "unet").options["upsample"] == best["options"]["upsample"]
    # --apply refuses a params file whose family trains another model than the tune did (unet_resnet50)
    target = work / "apply" / "params.yaml"
    target.parent.mkdir()
    shutil.copy(ROOT / "params.yaml", target)
    before = target.read_text()
    proc = run_cli("tune", "--apply", "--family", "unet", "-p", str(target), "-S", f"train.reports_dir={work / 'reports'}",
                   cwd=target.parent)
    assert_user_error(proc, "the unet tune trained unet", "families.unet.model unet_resnet50")
    assert target.read_text() == before
    proc = run_cli("tune", "--apply", "--family", "fcn", "-p", str(target), "-S", f"train.reports_dir={work / 'reports'}",
                   cwd=target.parent)
    assert_user_error(proc, "no tune result for fcn")


def test_apply_then_train_trains_the_tuned_config(tuned):
    """--apply changes only what the tune adopted (the optimiser phase's lr, into the family's own train
    block; upsample only when it beat the configured value beyond the seed spread, else a note says it
    was kept), keeps the rest (its options, the shared train block, the other families); `segpipe
    train` then trains exactly that, at the trials' global batch (trials: 1 worker x 8, training: 2 workers x 4)."""
    import yaml

    from mlflow.tracking import MlflowClient

    from pipeline.config import apply_overrides, read_yaml
    from pipeline.training.job import train

    work = tuned["work"]
    best = json.loads((work / "reports" / "tune" / "unet" / "best_config.json").read_text())
    adopted = "upsample" in best["values"]
    start = "transposed" if best["options"]["upsample"] != "transposed" else "bilinear"
    raw = apply_overrides(read_yaml(ROOT / "params.yaml"), tuned["overrides"] + [
        f"families.unet.options={{base_channels: 8, upsample: {start}}}", "families.unet.train={lr: 0.03}"])
    target = work / "apply2" / "params.yaml"
    target.parent.mkdir()
    target.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = load_params(target)
    proc = run_cli("tune", "--apply", "--family", "unet", "-p", str(target), cwd=target.parent)
    assert proc.returncode == 0, proc.stderr
    assert f"families.unet.train.lr: 0.03 -> {best['values']['lr']}" in proc.stdout, proc.stdout
    assert ("families.unet.options.upsample:" in proc.stdout) == adopted, proc.stdout
    assert proc.stdout.count("->") == 1 + adopted, proc.stdout
    if not adopted:
        assert "unet: upsample: no value beats the configured transposed beyond the seed spread" in proc.stdout
    applied = load_params(target)
    upsample = best["options"]["upsample"] if adopted else start
    assert applied.families["unet"].options == {"base_channels": 8, "upsample": upsample}
    assert applied.families["unet"].train == {"lr": best["values"]["lr"]} and applied.train == before.train
    assert {f: v for f, v in applied.families.items() if f != "unet"} == {f: v for f, v in before.families.items() if f != "unet"}

    summary = train(applied, "unet", progress=False)
    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    params = c.get_run(summary["mlflow_run_id"]).data.params
    assert params["model"] == "unet" and params["model_options.upsample"] == upsample
    assert params["model_options.base_channels"] == "8"
    assert float(params["train.lr"]) == best["values"]["lr"]  # the family's own train block, merged over the shared one
    trial = c.get_run(best["mlflow_run_id"]).data.params
    assert int(trial["ray.num_workers"]) * int(trial["train.batch_size"]) == 8
    assert int(params["ray.num_workers"]) * int(params["train.batch_size"]) == 8
    assert (params["ray.num_workers"], trial["ray.num_workers"]) == ("2", "1")


def test_apply_writes_searched_entries_into_the_family_block(tmp_path):
    """A DeepLabV3 tune that searched lr and aspp+atrous_rates and found cascade: lr goes to
    families.deeplabv3.train (not the shared train block, which every family uses), atrous_rates (n/a
    for cascade) is removed, backbone_weights and the rest are kept; no Ray needed."""
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    reports = tmp_path / "reports"
    (reports / "tune" / "deeplabv3").mkdir(parents=True)
    (reports / "tune" / "deeplabv3" / "best_config.json").write_text(json.dumps({
        "family": "deeplabv3", "model": "deeplabv3_resnet50",
        "options": {"aspp": "cascade", "output_stride": 16, "aux_loss": True},
        "train": {"lr": 0.0123}, "values": {"aspp": "cascade", "atrous_rates": None, "output_stride": 16, "lr": 0.0123},
        "val_mIoU": 0.5, "epochs": 2, "trial_id": "t1", "mlflow_run_id": "r", "mlflow_parent_run_id": "p"}))
    before = load_params(target)
    text_before = target.read_text()
    proc = run_cli("tune", "--apply", "--family", "deeplabv3", "-p", str(target), "-S", f"train.reports_dir={reports}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    applied = load_params(target)
    fam = applied.families["deeplabv3"]
    assert fam.model == "deeplabv3_resnet50" and fam.train == {"lr": 0.0123}
    assert fam.options == {**{k: v for k, v in before.families["deeplabv3"].options.items() if k != "atrous_rates"},
                           "aspp": "cascade", "output_stride": 16}
    assert fam.options["backbone_weights"] == "weights/resnet50-0676ba61.pth"
    assert applied.train == before.train  # the shared block is untouched
    assert {f: v for f, v in applied.families.items() if f != "deeplabv3"} == {
        f: v for f, v in before.families.items() if f != "deeplabv3"}
    assert "# segpipe params: the single source of every knob" in target.read_text()
    assert len(target.read_text().splitlines()) >= len(text_before.splitlines())


def test_bad_search_space_fails_before_any_trial(tmp_path, synthetic_shards):
    base = tune_overrides(synthetic_shards, tmp_path)
    for extra, needles in (
        (["tune.space.unet={upsample: {grid: [bilinear]}, dilation: {choice: [1, 2]}}"],
         ("tune.space.unet.dilation", "unknown entry")),
        (["tune.families=[deeplabv3]", "tune.space.deeplabv3={atrous_rates: {grid: [[6, 12, 18], [6, 12]]}}"],
         ("tune.space.deeplabv3.atrous_rates", "(6, 12)")),
    ):
        proc = run_cli("tune", *_args(base + extra), cwd=tmp_path, no_ray=True)
        assert_user_error(proc, *needles)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("space, needles", [
    ({"variant": {"grid": ["32s", "4s"]}}, ("tune.space.fcn.variant", "'4s'")),
    ({"upsample": {"grid": ["bilinear", "nearest"]}}, ("tune.space.fcn.upsample", "nearest")),
    ({"lr": {"choice": [0.01, -1]}}, ("tune.space.fcn.lr", "-1")),
    ({"model": "unet"}, ("tune.space.fcn.model", "not a fcn model")),
    ({"width": {"uniform": [0.1, 2.0]}}, ("tune.space.fcn.width",)),
    ({"variant": "8s"}, ("tune.space.fcn.variant", "must tune the model that is trained", "fcn32s_vgg16")),
])
def test_bad_entries_name_the_entry(space, needles, tmp_path, synthetic_shards):
    from pipeline.errors import UserError
    from pipeline.tuning.space import resolve_space

    p = load_params(ROOT / "params.yaml", tune_overrides(synthetic_shards, tmp_path) + [f"tune.space.fcn={json.dumps(space)}"])
    with pytest.raises(UserError) as err:
        resolve_space(p, "fcn")
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_space_schema_and_joint_aspp_rates(tmp_path, synthetic_shards):
    from pipeline.config import ParamsError
    from pipeline.tuning.space import apply_values, decode, param_space, resolve_space

    with pytest.raises(ParamsError, match=r"tune.space: fcn.upsample: a search entry is one of"):
        load_params(ROOT / "params.yaml", ["tune.space.fcn={upsample: {grd: [bilinear]}}"])
    with pytest.raises(ParamsError, match=r"unet.lr.loguniform: low must be > 0"):
        load_params(ROOT / "params.yaml", ["tune.space.unet={lr: {loguniform: [0, 1]}}"])
    # the committed space, with a DeepLabV3 that builds without weight files: atrous_rates only
    # applies to aspp=parallel, so the grid holds 4 parallel + 1 cascade per output stride
    p = load_params(ROOT / "params.yaml", [
        "families.deeplabv3.options={atrous_rates: [12, 24, 36], output_stride: 8, aux_loss: true}"])
    space = resolve_space(p, "deeplabv3")
    ps = param_space(space, "random")
    assert len(ps["aspp+atrous_rates"]["grid_search"]) == 5 and ps["output_stride"]["grid_search"] == [8, 16]
    cascade = decode(space, {"aspp+atrous_rates": json.dumps({"aspp": "cascade", "atrous_rates": None}),
                             "output_stride": 16, "lr": 0.01, "weight_decay": 1e-4})
    model, options, train = apply_values(space, cascade)
    assert options["aspp"] == "cascade" and "atrous_rates" not in options and options["output_stride"] == 16
    assert train == {"lr": 0.01, "weight_decay": 1e-4}
    # FCN variants map to the registry names; optuna turns grids into choices
    p = load_params(ROOT / "params.yaml", ["families.fcn.options={upsample: transposed}"])
    fcn = resolve_space(p, "fcn")
    assert apply_values(fcn, decode(fcn, {"variant": "16s", "upsample": "bilinear", "lr": 0.01, "weight_decay": 0.0}))[0] == "fcn16s_vgg16"
    from ray.tune.search.sample import Categorical

    assert param_space(fcn, "random")["variant"] == {"grid_search": ["32s", "16s", "8s"]}
    assert isinstance(param_space(fcn, "optuna")["variant"], Categorical)


def test_plots_heatmap_and_upsample_bars(tmp_path):
    """The DeepLabV3 heat map (atrous_rates x output_stride, one panel per aspp) and the FCN bars
    (upsampling method x variant) draw from trial rows."""
    from pipeline.figures.tune import make_plots
    from pipeline.tuning.space import Space

    rows = []
    for i, (rates, stride, aspp) in enumerate([([6, 12, 18], 8, "parallel"), ([12, 24, 36], 16, "parallel"),
                                               (None, 16, "cascade")]):
        values = {"atrous_rates": rates, "output_stride": stride, "aspp": aspp, "lr": 0.01 * (i + 1)}
        options = {k: v for k, v in values.items() if k != "lr" and v is not None}
        rows.append({"values": values, "options": options, "model": "deeplabv3_resnet50", "val_mIoU": 0.1 * (i + 1),
                     "status": "completed" if i else "early_stopped"})
    space = Space(family="deeplabv3", model="deeplabv3_resnet50", options={}, train={},
                  searched={"atrous_rates": ("grid", [[6, 12, 18], [12, 24, 36]]), "output_stride": ("grid", [8, 16]),
                            "aspp": ("grid", ["parallel", "cascade"]), "lr": ("loguniform", [0.001, 0.1])})
    names = {p.name for p in make_plots(rows, space, tmp_path)}
    assert names == {"miou_vs_atrous_rates.png", "miou_vs_output_stride.png", "miou_vs_aspp.png", "miou_vs_lr.png",
                     "miou_by_rates_stride.png"}
    rows = [{"values": {"variant": v, "upsample": u}, "options": {"upsample": u}, "model": f"fcn{v}_vgg16",
             "val_mIoU": 0.2, "status": "completed"} for v in ("32s", "8s") for u in ("bilinear", "unpool")]
    fcn = Space(family="fcn", model="fcn8s_vgg16", options={}, train={},
                searched={"variant": ("grid", ["32s", "8s"]), "upsample": ("grid", ["bilinear", "unpool"])})
    assert "miou_by_upsample.png" in {p.name for p in make_plots(rows, fcn, tmp_path)}
    assert all(p.stat().st_size > 5000 for p in tmp_path.glob("*.png"))


def test_plots_follow_the_searched_entries_not_the_family(tmp_path):
    """A UNet tune of lr only draws no upsample bars; one that searches upsample draws them (one bar
    per model), and a DeepLabV3 tune of lr only draws no heat map."""
    from pipeline.figures.tune import make_plots
    from pipeline.tuning.space import Space

    rows = [{"values": {"lr": 0.01 * (i + 1)}, "options": {"upsample": "transposed"}, "model": "unet",
             "val_mIoU": 0.1 * (i + 1), "status": "completed"} for i in range(2)]
    only_lr = Space(family="unet", model="unet", options={}, train={}, searched={"lr": ("loguniform", [0.001, 0.1])})
    assert {p.name for p in make_plots(rows, only_lr, tmp_path)} == {"miou_vs_lr.png"}
    dl = Space(family="deeplabv3", model="deeplabv3_resnet50", options={}, train={},
               searched={"lr": ("loguniform", [0.001, 0.1])})
    dl_rows = [{**r, "model": "deeplabv3_resnet50", "options": {}} for r in rows]
    assert {p.name for p in make_plots(dl_rows, dl, tmp_path)} == {"miou_vs_lr.png"}
    rows = [{"values": {"model": m, "upsample": u}, "options": {"upsample": u}, "model": m, "val_mIoU": 0.2,
             "status": "completed"} for m in ("unet", "unet_resnet50") for u in ("bilinear", "transposed")]
    both = Space(family="unet", model="unet", options={}, train={},
                 searched={"model": ("grid", ["unet", "unet_resnet50"]), "upsample": ("grid", ["bilinear", "transposed"])})
    assert "miou_by_upsample.png" in {p.name for p in make_plots(rows, both, tmp_path)}


def test_family_train_block_schema_and_trial_batch(tmp_path, synthetic_shards):
    """families.<f>.train takes train keys (validated) but not the shared bookkeeping ones; a trial
    trains with the family's block at the training run's global batch."""
    from pipeline.config import ParamsError
    from pipeline.errors import UserError
    from pipeline.tuning.space import resolve_space, trial_params

    base = tune_overrides(synthetic_shards, tmp_path)
    for bad, needle in (("{models_dir: x}", "models_dir: not a per-family train setting"),
                        ("{lr: -1}", "lr"), ("{learning_rate: 0.1}", "learning_rate")):
        with pytest.raises(ParamsError) as err:
            load_params(ROOT / "params.yaml", base + [f"families.unet.train={bad}"])
        assert needle in str(err.value) and "families.unet.train" in str(err.value), str(err.value)
    p = load_params(ROOT / "params.yaml", base + ["families.unet.train={lr: 0.03, weight_decay: 0.0}"])
    space = resolve_space(p, "unet")
    t = trial_params(p, space, {"upsample": "bilinear"})
    assert (t.train.lr, t.train.weight_decay, t.train.batch_size, t.ray.num_workers) == (0.03, 0.0, 8, 1)
    assert t.families["unet"].train == {} and t.families["unet"].options["upsample"] == "bilinear"
    p3 = load_params(ROOT / "params.yaml", base + ["tune.num_workers=3"])
    with pytest.raises(UserError, match="global batch .* tune.num_workers=3"):
        resolve_space(p3, "unet")


def test_tune_split_is_carved_from_train_and_trials_select_on_it(tmp_path, params_file):
    """data.tune_split: preprocess writes the ids with the smallest sha256 (or the listed ids) as their own
    `tune` split (rows copied from train, which stays whole for the final training); trials train on
    train-tune and select on tune, never on val."""
    import hashlib

    from pipeline.data.loaders import ShardDataset, load_manifest
    from pipeline.errors import UserError
    from pipeline.data.sources import fetch
    from pipeline.data.shards import preprocess
    from pipeline.tuning.space import trial_splits
    from tests.support.files import tree_snapshot

    d = tmp_path / "data"
    opts = [f"data.dir={d}", "data.source=synthetic", "data.synthetic.train_count=12", "data.synthetic.val_count=3",
            "data.synthetic.size=32", "data.row_group_rows=5"]
    fetch(load_params(params_file, opts), progress=False)
    m = preprocess(load_params(params_file, opts + ["data.tune_split=0.25"]), progress=False)
    assert (m["splits"]["train"]["count"], m["splits"]["tune"]["count"], m["splits"]["val"]["count"]) == (12, 3, 3)
    ids = lambda split: [ShardDataset(d, split).raw(i)[0] for i in range(len(ShardDataset(d, split)))]  # noqa: E731
    train, tune = ids("train"), ids("tune")
    assert sorted(tune) == sorted(sorted(train, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:3])
    rest = ids("train-tune")
    assert sorted(rest + tune) == sorted(train) and not set(rest) & set(tune)
    assert ShardDataset(d, "tune").raw(0)[1:] == ShardDataset(d, "train").raw(train.index(tune[0]))[1:]  # same bytes
    assert trial_splits(load_params(params_file, opts)) == {"train_split": "train-tune", "val_split": "tune"}
    # an id list; an id that is not a train id fails before anything is written
    m = preprocess(load_params(params_file, opts + [f"data.tune_split={json.dumps(train[:2])}"]), progress=False)
    assert m["splits"]["tune"]["count"] == 2 and sorted(ids("tune")) == sorted(train[:2])
    before = tree_snapshot(d / "shards")
    with pytest.raises(UserError, match="not train ids: nope"):
        preprocess(load_params(params_file, opts + ['data.tune_split=["nope"]']), progress=False)
    assert tree_snapshot(d / "shards") == before
    # no tune split: trials fall back to val (and say so in their eval_split tag)
    preprocess(load_params(params_file, opts + ["data.tune_split=0"]), progress=False)
    assert "tune" not in load_manifest(d)["splits"]
    assert trial_splits(load_params(params_file, opts)) == {"train_split": "train", "val_split": "val"}
    for bad in ("data.tune_split=0.9", "data.tune_split=[1, 2]"):
        with pytest.raises(UserError, match="data.tune_split"):
            load_params(params_file, opts + [bad])
