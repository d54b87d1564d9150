"""`segpipe report`, `segpipe ui` and `segpipe predict` on a tiny real run set: 2 families x 2 seeds,
2 epochs each, trained with real Ray into a real sqlite MLflow store. The report's numbers must be
the ones MLflow holds; its PNGs must decode and show something; the UI server must answer MLflow's
REST API and stop with its PID; predict must write masks from the registered model and name the
images it could not read."""

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.support.cli import assert_user_error, run_cli
from tests.support.paths import ROOT, SAMPLE_TAR
from tests.support.procs import free_port
from tests.support.training import TRAINED_FAMILIES, TRAINED_SEEDS

# one xdist worker runs this module and test_train_all.py (`make test` runs pytest -n 2 --dist
# loadgroup): they read the same session run set, and the module fixtures here are made once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("trained")]

FAMILIES, SEEDS = TRAINED_FAMILIES, TRAINED_SEEDS  # lraspp, unet x 0, 1


def _args(params: Path, *extra: str) -> list[str]:
    return ["-p", str(params), *extra]


@pytest.fixture(scope="module")
def runs(trained_all):
    """The session's `train --all` run set (tests/integration/conftest.py: FAMILIES x SEEDS, 2
    epochs, trained at once); returns (work dir, params file, {(family, seed): summary})."""
    work, params = trained_all["work"], trained_all["params"]
    out = {}
    for seed in SEEDS:
        for fam in FAMILIES:
            metrics = work / "reports" / "metrics"  # a few numbers + ids/strings in the _detail sibling
            out[(fam, seed)] = {**json.loads((metrics / f"{fam}-seed{seed}_detail.json").read_text()),
                                **json.loads((metrics / f"{fam}-seed{seed}.json").read_text())}
    return work, params, out


@pytest.fixture(scope="module")
def report(runs):
    """`segpipe report` as a user runs it; returns (work, params, summaries, comparison.json, md text)."""
    work, params, summaries = runs
    proc = run_cli("report", *_args(params), cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    out = work / "reports"
    return work, params, summaries, json.loads((out / "comparison.json").read_text()), (out / "comparison.md").read_text()


def _mlflow_runs(work: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = c.get_experiment_by_name("segpipe")
    return c, exp, c.search_runs([exp.experiment_id], "tags.stage = 'train'")


def test_train_outputs_are_named_by_family_and_seed(runs):
    from pipeline.config import load_params
    from pipeline.stages.quickstart import summary_table

    work, params, summaries = runs
    for (fam, seed), s in summaries.items():
        assert s["seed"] == seed and s["family"] == fam
        assert (work / "models" / f"{fam}-seed{seed}.pt").is_file()
        assert (work / "reports" / "metrics" / f"{fam}-seed{seed}_epochs.csv").is_file()
    table = summary_table(load_params(params))
    for (fam, seed), s in summaries.items():
        assert re.search(rf"^{fam}\s+{seed}\s+\S+\s+{s['mIoU']:.3f}", table, re.M), table
    c, _, mruns = _mlflow_runs(work)
    assert sorted((r.data.tags["family"], r.data.tags["seed"]) for r in mruns) == \
        sorted((f, str(s)) for f in FAMILIES for s in SEEDS)


def test_report_numbers_are_mlflows(report):
    work, params, summaries, js, md = report
    c, exp, mruns = _mlflow_runs(work)
    assert [f["family"] for f in js["families"]] == list(FAMILIES)
    assert js["seeds"] == list(SEEDS)
    in_report = c.search_runs([exp.experiment_id], "tags.in_report = '1'")  # the README's UI filter
    assert {r.info.run_id for r in in_report} == {r["run_id"] for f in js["families"] for r in f["runs"]}
    for fam_js in js["families"]:
        fam = fam_js["family"]
        rs = sorted((r for r in mruns if r.data.tags["family"] == fam), key=lambda r: int(r.data.tags["seed"]))
        assert [r.info.run_id for r in rs] == [summaries[(fam, s)]["mlflow_run_id"] for s in SEEDS]
        assert [r["run_id"] for r in fam_js["runs"]] == [r.info.run_id for r in rs]
        for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
            vals = [r.data.metrics[f"val/{key}"] for r in rs]
            assert fam_js[key]["mean"] == pytest.approx(statistics.fmean(vals), abs=1e-12), key
            assert fam_js[key]["std"] == pytest.approx(statistics.stdev(vals), abs=1e-12), key
        for cls, v in fam_js["per_class_iou"].items():
            vals = [r.data.metrics[f"val/iou/{cls}"] for r in rs if f"val/iou/{cls}" in r.data.metrics]
            assert v == (pytest.approx(statistics.fmean(vals)) if vals else None), cls
        for r, rj in zip(rs, fam_js["runs"]):
            assert rj["train_seconds"] == pytest.approx((r.info.end_time - r.info.start_time) / 1000)
            ips = [m.value for m in c.get_metric_history(r.info.run_id, "train/img_per_s")]
            assert rj["img_per_s"] == pytest.approx(statistics.fmean(ips))
            assert rj["git_commit"] == r.data.tags["git_commit"]
        # what the report measures itself
        from seg_models import build_model

        n_params = sum(t.numel() for t in build_model(fam_js["model"], **fam_js["options"]).parameters()) / 1e6
        assert fam_js["params_M"] == pytest.approx(n_params)
        assert fam_js["gflops"] > 0 and fam_js["latency_ms"] > 0 and fam_js["eval_size"] == 64
        # the Markdown row shows the same numbers
        m = fam_js["mIoU"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {fam} | "))
        assert f"{m['mean']:.3f} ± {m['std']:.3f}" in row, row
        assert f"{fam_js['params_M']:.2f}" in row and f"{fam_js['gflops']:.2f}" in row
        assert f"{fam_js['latency_ms']:.1f}" in row
        assert all(r["run_id"][:8] in row for r in fam_js["runs"])
    assert js["latency"]["device"] in md
    # per-class table: the 21 VOC classes
    from pipeline.data.voc import VOC_CLASSES

    for cls in VOC_CLASSES:
        assert re.search(rf"^\| {cls} \|", md, re.M), cls
    assert "seed spread" in md and len(js["comparisons"]) == 1
    assert "How this was produced" in md and "synthetic" in md


def test_report_pngs_decode_and_are_linked(report):
    from PIL import Image

    work, _, _, js, md = report
    figs = work / "reports" / "figures"
    names = {p.name for p in figs.glob("*.png")}
    assert {"miou_vs_params.png", "miou_vs_latency.png", "miou_per_epoch.png", "per_class_iou.png",
            "qualitative.png", "confusion_lraspp.png", "confusion_unet.png"} <= names
    for name in names:
        assert f"](figures/{name})" in md, name
        with Image.open(figs / name) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"))
        assert arr.shape[0] > 200 and arr.shape[1] > 200, name
        assert arr.std() > 5 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 20, f"{name} looks blank"
    assert not list((work / "reports").glob(".comparison-*")), "staging left behind"


def test_best_run_of_each_family_is_registered(report):
    from pipeline.reporting.runs import Group, RunRecord
    from pipeline.tracking.report import register_best

    work, _, summaries, js, md = report
    c, _, _ = _mlflow_runs(work)
    assert "The seed is chosen on val, the split its mIoU is measured on, so that figure is optimistic" in md
    for fam in FAMILIES:
        best = max(SEEDS, key=lambda s: (summaries[(fam, s)]["mIoU"], -s))
        mv = c.get_model_version_by_alias(f"segpipe-{fam}", "best")
        assert mv.run_id == summaries[(fam, best)]["mlflow_run_id"]
        reg = next(f for f in js["families"] if f["family"] == fam)["registered"]
        assert reg["name"] == f"segpipe-{fam}" and reg["version"] == int(mv.version)
        # registering the same best run again adds no version
        rec = RunRecord(run_id=mv.run_id, family=fam, model="x", seed=best, start_ms=0, end_ms=0,
                        metrics={"val/mIoU": summaries[(fam, best)]["mIoU"]}, params={}, tags={}, model_id="m-unused")
        assert register_best(c, Group(fam, "x", [rec]))["new"] is False
        assert len(c.search_model_versions(f"name = 'segpipe-{fam}'")) == 1


def test_ui_answers_runs_search_and_stops_by_pid(report):
    work, params, summaries, js, _ = report
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", *_args(params), "--port", str(port)], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server_pid = None
    try:
        lines, deadline = [], time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"server pid (\d+)", line)
            if m:
                server_pid = int(m.group(1))
                break
        out = "".join(lines)
        assert f"MLflow UI: http://127.0.0.1:{port}" in out, out
        assert server_pid, out
        # the printed link opens the model-training view (not MLflow 3's GenAI view), charts, train runs
        link = re.search(r"chart view\): (\S+)", out).group(1)  # the report ran: its runs carry in_report=1
        assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/{js['experiment_id']}/runs?"), link
        query = urllib.parse.parse_qs(link.split("?", 1)[1])
        assert query == {"workflowType": ["machine_learning"], "compareRunsMode": ["CHART"],
                         "searchFilter": ["tags.in_report = '1'"]}, query
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get?experiment_id="
                                    f"{js['experiment_id']}", timeout=30) as r:
            exp_tags = {t["key"]: t["value"] for t in json.load(r)["experiment"].get("tags", [])}
        assert exp_tags.get("mlflow.experimentKind") == "custom_model_development", exp_tags
        body = json.dumps({"experiment_ids": [js["experiment_id"]], "filter": "tags.stage = 'train'"}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            found = json.load(r)["runs"]
        ids = {r["info"]["run_id"] for r in found}
        assert ids == {s["mlflow_run_id"] for s in summaries.values()}
        tags = {t["key"]: t["value"] for t in found[0]["data"]["tags"]}
        assert {"family", "model", "seed", "stage", "git_commit", "data_source"} <= set(tags)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + rest
        assert "stopped" in rest
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid, 0)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "the server still answers"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server_pid:
            try:
                os.killpg(server_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _sample_images(dst: Path) -> list[Path]:
    """The 3 val JPEGs of the bundled VOC sample."""
    dst.mkdir()
    out = []
    with tarfile.open(SAMPLE_TAR) as tar:
        val = tar.extractfile("VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read().decode().split()
        for sid in val:
            data = tar.extractfile(f"VOCdevkit/VOC2012/JPEGImages/{sid}.jpg").read()
            (dst / f"{sid}.jpg").write_bytes(data)
            out.append(dst / f"{sid}.jpg")
    return out


def test_predict_registered_model_on_sample_images(report, tmp_path):
    from PIL import Image

    work, params, _, _, _ = report
    images = _sample_images(tmp_path / "imgs")
    broken = tmp_path / "imgs" / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    args = [str(images[0]), str(broken), *map(str, images[1:])]
    proc = run_cli("predict", *_args(params), "--model", "models:/segpipe-unet@best", *args, "--out", str(tmp_path / "out"),
                   cwd=work)
    assert_user_error(proc, "broken.jpg", "1 of 4")
    for img in images:
        with Image.open(img) as im:
            size = im.size
        with Image.open(tmp_path / "out" / f"{img.stem}_mask.png") as m:
            assert m.mode == "P" and m.size == size
            assert np.asarray(m).max() <= 20
        with Image.open(tmp_path / "out" / f"{img.stem}_overlay.png") as o:
            assert o.mode == "RGB" and o.size == size
    assert not list((tmp_path / "out").glob("broken*"))
    assert all(img.name in proc.stdout for img in images)


def test_predict_from_checkpoint_and_bad_models(report, tmp_path, capsys):
    from pipeline.config import load_params
    from pipeline.errors import UserError
    from pipeline.reporting.predict import predict

    work, params, _, _, _ = report
    p = load_params(params)
    img = _sample_images(tmp_path / "imgs")[0]
    res = predict(p.model_copy(update={"train": p.train.model_copy(update={"eval_size": 513})}),
                  str(work / "models" / "lraspp-seed1.pt"), [str(img)], tmp_path / "out")
    assert [Path(m).name for _, m, _ in res["written"]] == [f"{img.stem}_mask.png"]
    assert "at 64x64" in capsys.readouterr().out  # the size the checkpoint was trained at, not params.yaml's
    with pytest.raises(UserError, match="no such checkpoint"):
        predict(p, str(tmp_path / "nope.pt"), [str(img)], tmp_path / "o2", progress=False)
    with pytest.raises(UserError, match="not a segpipe checkpoint"):
        predict(p, str(img), [str(img)], tmp_path / "o3", progress=False)
    with pytest.raises(UserError, match="segpipe-segformer@best"):
        predict(p, "models:/segpipe-segformer@best", [str(img)], tmp_path / "o4", progress=False)
    assert not (tmp_path / "o2").exists()


def test_report_and_ui_without_a_store_are_user_errors(tmp_path, params_file):
    for stage in ("report", "ui"):
        proc = run_cli(stage, "-p", str(params_file), "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'none.db'}",
                       cwd=tmp_path)
        assert_user_error(proc, "no MLflow store")
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "mlflow.db").exists()
    proc = run_cli("train", "-p", str(params_file), "--family", "unet", "--seed", "-1", cwd=tmp_path)
    assert_user_error(proc, "(--seed)")


def test_dvc_matrix_is_family_by_seed_and_report_follows_train(tmp_path):
    bin_dir = Path(sys.executable).parent
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def dvc(*a):
        return subprocess.run([str(bin_dir / "dvc"), *a], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc("init", "-q").returncode == 0
    seeds = yaml.safe_load((ROOT / "params.yaml").read_text())["seeds"]
    families = yaml.safe_load((ROOT / "params.yaml").read_text())["families"]
    listed = dvc("stage", "list", "--name-only").stdout.split()
    assert {f"train@{f}-{s}" for f in families for s in seeds} <= set(listed)
    dot = dvc("dag", "--dot", "report").stdout
    for f in families:
        for s in seeds:
            assert re.search(rf'"train@{f}-{s}"\s*->\s*"report"', dot), (f, s, dot)


def test_tune_trials_give_a_tune_plot(tmp_path, params_file):
    """Tune trial runs (stage=tune-trial, hp.* params as `segpipe tune` logs them) -> the knobs that
    vary, each trial's val mIoU, and a PNG with one panel per knob."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pipeline.config import load_params
    from pipeline.tracking.report import tune_trials
    from pipeline.figures.report import tune_png

    p = load_params(params_file)
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("segpipe", artifact_location=(tmp_path / "mlruns").as_uri())
    want = {}
    for i, (lr, rates) in enumerate([(0.001, "[6, 12, 18]"), (0.01, "[12, 24, 36]"), (0.1, "[6, 12, 18]")]):
        r = c.create_run(exp, tags={"family": "deeplabv3", "stage": "tune-trial", "seed": "0"})
        c.log_batch(r.info.run_id, params=[Param("hp.lr", str(lr)), Param("hp.atrous_rates", rates), Param("train.lr", str(lr)),
                                           Param("train.epochs", "2")],
                    metrics=[Metric("val/mIoU", 0.1 * (i + 1), 0, 2)])
        want[r.info.run_id] = (lr, [int(x) for x in rates.strip("[]").split(",")], 0.1 * (i + 1))
    c.create_run(exp, tags={"family": "deeplabv3", "stage": "train", "seed": "0"})  # not a trial
    trials = tune_trials(c, exp, p)
    assert {t["run_id"]: (t["config"]["hp.lr"], t["config"]["hp.atrous_rates"], t["mIoU"]) for t in trials} == want
    assert all(set(t["config"]) == {"hp.atrous_rates", "hp.lr"} for t in trials)
    path = tune_png(trials, ["hp.atrous_rates", "hp.lr"], tmp_path / "tune.png", "trials")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 5


def test_report_averages_only_seeds_of_one_setting(tmp_path, params_file):
    """Like with like: a tuned seed 0 (another train.lr) and a seed at another worker count (global
    batch) are not averaged with the untuned seeds; they are listed as left out with the keys that
    differ. Runs are made the way `segpipe train` makes them (tracking.start_run, real sqlite store)."""
    from pipeline.config import load_params
    from pipeline.reporting.runs import select_runs
    from pipeline.tracking import client, end_run, experiment_id, start_run
    from pipeline.tracking.report import train_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["data.source=synthetic", "seeds=[0, 1, 2]", "families.lraspp.options={}", "families.unet.options={}",
            "families.fcn.options={}", "families.deeplabv3.options={}"]

    def train_run(seed: int, *extra: str, family: str = "lraspp") -> str:
        p = load_params(params_file, base + [f"seed={seed}", f"mlflow.tracking_uri={uri}", *extra])
        run_id = start_run(uri, p, family=family, model=p.families[family].model, options={}, stage="train")
        end_run(uri, run_id, "FINISHED")
        return run_id

    untuned = {seed: train_run(seed) for seed in (0, 1, 2)}
    unet = train_run(0, family="unet")
    tuned0 = train_run(0, "train.lr=0.05")              # `segpipe train -p best_params.yaml` for seed 0 only
    wide2 = train_run(2, "ray.num_workers=2")           # seed 2 again at another global batch
    same1 = train_run(1, "train.loader_workers=0")      # bookkeeping only: the same experiment, newer
    p = load_params(params_file, base + [f"mlflow.tracking_uri={uri}"])
    c = client(uri)
    chosen, left = select_runs(train_runs(c, experiment_id(c, "segpipe")), p)
    assert {k: r.info.run_id for k, r in chosen.items()} == {
        ("lraspp", 0): untuned[0], ("lraspp", 1): same1, ("lraspp", 2): untuned[2], ("unet", 0): unet}
    # the README's UI filter selects exactly the runs the report averages (report keeps the tag current)
    from pipeline.tracking import mark_in_report

    def ui_filter() -> set[str]:
        return {r.info.run_id for r in c.search_runs([experiment_id(c, "segpipe")], "tags.in_report = '1'")}

    mark_in_report(c, experiment_id(c, "segpipe"), [r.info.run_id for r in chosen.values()])
    assert ui_filter() == {r.info.run_id for r in chosen.values()}
    text = "\n".join(left)
    assert f"lraspp seed 0 (run {tuned0[:8]})" in text and "train.lr=0.05 (averaged: 0.01)" in text
    assert f"lraspp seed 2 (run {wide2[:8]})" in text and "ray.num_workers=2 (averaged: 4)" in text
    assert "global_batch=16 (averaged: 32)" in text
    wide_line = next(line for line in left if wide2[:8] in line)
    assert "train.lr" not in wide_line and "seed=" not in wide_line  # only the keys that differ
    assert "1 × older run of the same family, seed and setting" in left

    # once seeds 1 and 2 are retrained with the tuned lr, the tuned setting has the most seeds and wins
    tuned = {0: tuned0, 1: train_run(1, "train.lr=0.05"), 2: train_run(2, "train.lr=0.05")}
    chosen, left = select_runs(train_runs(c, experiment_id(c, "segpipe")), p)
    assert {s: chosen[("lraspp", s)].info.run_id for s in (0, 1, 2)} == tuned
    mark_in_report(c, experiment_id(c, "segpipe"), [r.info.run_id for r in chosen.values()])
    assert ui_filter() == {r.info.run_id for r in chosen.values()} == set(tuned.values()) | {unet}
    assert sum("train.lr=0.01 (averaged: 0.05)" in line for line in left) == 4  # 3 untuned + the wide one


def test_runs_log_the_effective_atrous_rates(tmp_path, params_file):
    """ASPP rates are given at output stride 16 (atrous_rates_at: 16); each run logs the dilations it used."""
    from pipeline.config import load_params
    from pipeline.tracking import client, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    got = {}
    for stride in (8, 16):
        p = load_params(params_file, [f"mlflow.tracking_uri={uri}"])
        options = {**{k: v for k, v in p.families["deeplabv3"].options.items() if k != "backbone_weights"},
                   "output_stride": stride}
        run_id = start_run(uri, p, family="deeplabv3", model="deeplabv3_resnet50", options=options, stage="train")
        params = client(uri).get_run(run_id).data.params
        got[stride] = (params["model_options.atrous_rates"], params["model_effective.atrous_rates"])
    assert got == {8: ("[6, 12, 18]", "[12, 24, 36]"), 16: ("[6, 12, 18]", "[6, 12, 18]")}


@pytest.mark.parametrize("profile", ["torchvision", "deeplabv3-paper", "mmseg-deeplabv3-r50"])
def test_recipe_profiles_validate_and_name_their_anchor(profile, params_file, tmp_path):
    """`segpipe quickstart --profile <p> --dry-run` validates the profile over params.yaml (models built
    on the meta device; weight files come from DVC's weights stage); each names its published figure."""
    from pipeline.config import load_params
    from pipeline.profiles import profile_anchors, profile_overrides

    proc = run_cli("quickstart", "--profile", profile, "--dry-run", "-p", str(params_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"++profile={profile}" in proc.stdout and "anchors" not in proc.stdout
    p = load_params(params_file, profile_overrides(profile))
    assert p.profile == profile
    anchors = profile_anchors(profile)
    assert anchors and all({"figure", "miou", "dataset", "split", "source"} <= set(a) for a in anchors.values())
    if profile == "torchvision":
        assert {f: a["miou"] for f, a in anchors.items()} == {"fcn": 60.5, "deeplabv3": 66.4, "lraspp": 57.9}
        assert (p.train.lr, p.train.aux_lr_mult, p.train.aux_weight, p.train.crop_size) == (0.02, 10.0, 0.5, 480)
        assert p.families["lraspp"].train == {"weight_decay": 1e-6} and p.train.weight_decay == 1e-4
        assert p.train.batch_size * p.ray.num_workers == 32
    elif profile == "mmseg-deeplabv3-r50":
        assert anchors == {"deeplabv3": anchors["deeplabv3"]} and anchors["deeplabv3"]["miou"] == 76.17
        assert p.train.eval_resize == "short_side" and p.train.photometric and p.train.cat_max_ratio == 0.75
    else:
        assert anchors["deeplabv3"]["miou"] == 77.21
        d = p.families["deeplabv3"]
        assert d.model == "deeplabv3_resnet101" and d.options["output_stride"] == 16
        assert d.options["multi_grid"] == [1, 2, 4] and p.train.batch_size * p.ray.num_workers == 16
        assert p.train.lr == 0.007
    assert profile_anchors("quickstart") == {} and profile_anchors("no-such-profile") == {}


def test_report_prints_anchors_splits_and_tuned_marks(tmp_path, params_file):
    """The markdown beside each family's row, rendered from a saved comparison.json alone: the anchor
    of the runs' profile with the data and split difference; the split the numbers come from; † for a
    family tuned on the tune split, and the warning for one tuned on val."""
    from types import SimpleNamespace

    from pipeline.config import load_params
    from pipeline.reporting.compare import report_anchors, to_comparison
    from pipeline.reporting.markdown import render
    from pipeline.reporting.runs import Group, RunRecord

    p = load_params(params_file, ["seeds=[0]"])
    tags = {"profile": "torchvision", "eval_split": "val", "git_commit": "abc"}
    groups = [Group(f, m, [RunRecord(f"run{f}", f, m, 0, 0, 1000, {"val/mIoU": 0.5}, {}, dict(tags))])
              for f, m in (("deeplabv3", "deeplabv3_resnet50"), ("unet", "unet_resnet50"))]
    anchors = report_anchors(p, groups)
    assert set(anchors) == {"deeplabv3"} and anchors["deeplabv3"]["miou"] == 66.4
    assert anchors["deeplabv3"]["differs"] and anchors["deeplabv3"]["recipe"].startswith("torchvision's")
    s = to_comparison(p, "sqlite:///x", SimpleNamespace(name="segpipe", experiment_id="1"), groups, "cpu",
                      ["lraspp seed 1 (run x): another setting: train.lr=0.1 (averaged: 0.01)"], [], [],
                      {"deeplabv3": "tune", "unet": "val"}, {})
    (tmp_path / "comparison.json").write_text(json.dumps(s, indent=2) + "\n")
    md = render(json.loads((tmp_path / "comparison.json").read_text()))
    assert md == render(s)
    row = next(line for line in md.splitlines() if line.startswith("| deeplabv3"))
    assert "deeplabv3 †" in row and "66.4 (torchvision)" in row
    assert md.startswith("# Semantic segmentation on PASCAL VOC: DeepLabV3 vs UNet")  # seg_models FAMILIES names
    assert "trained on COCO train2017" in md and "(here `voc2012_aug`)" in md and "COCO val2017, 20 VOC classes" in md
    assert "measured on the `val` split" in md
    differs = next(line for line in md.splitlines() if "Settings that still differ from torchvision's" in line)
    assert all(d in differs for d in anchors["deeplabv3"]["differs"])  # every difference the profile lists
    assert "deeplabv3: tuned by `segpipe tune`, trials selected on the `tune` split, not on `val`" in md
    assert "unet: tuned by `segpipe tune`, trials selected on the `val` split (the published split" in md
    assert "  - lraspp seed 1 (run x): another setting" in md


def test_tuned_mark_only_for_runs_trained_with_the_tuned_values(tmp_path, params_file):
    """Issue 16: tune trials exist for lraspp and deeplabv3, but only runs trained with the values of
    the tune's best config (the tune parent run's best.* params, what `segpipe tune --apply` writes
    into params.yaml) get the † mark; untuned runs of a tuned family get none. Real sqlite store,
    runs made the way train and tune make them (tracking.start_run)."""
    from types import SimpleNamespace

    from mlflow.entities import Metric, Param

    from pipeline.config import load_params
    from pipeline.reporting.compare import to_comparison, tuned_families
    from pipeline.reporting.markdown import render
    from pipeline.reporting.runs import select_runs, to_groups
    from pipeline.tracking import client, end_run, experiment_id, start_run
    from pipeline.tracking.report import load_records, train_runs, tune_best_configs, tune_trials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["data.source=synthetic", "seeds=[0]", "families.lraspp.options={}", "families.unet.options={}",
            "families.fcn.options={}", "families.deeplabv3.options={}", f"mlflow.tracking_uri={uri}"]
    c = client(uri)

    def run(family: str, stage: str, *extra: str, options: dict | None = None) -> str:
        p = load_params(params_file, base + list(extra))
        run_id = start_run(uri, p, family=family, model=p.families[family].model, options=options or {}, stage=stage)
        end_run(uri, run_id, "FINISHED")
        return run_id

    for fam, best in (("lraspp", {"lr": "0.05"}), ("deeplabv3", {"lr": "0.01235", "atrous_rates": "(6, 12, 18)"})):
        parent = run(fam, "tune")  # `segpipe tune` logs best.<searched key> (as _show writes it) and best.model
        model = load_params(params_file, base).families[fam].model
        c.log_batch(parent, params=[Param(f"best.{k}", v) for k, v in {**best, "model": model}.items()])
        for i in range(2):
            trial = c.create_run(experiment_id(c, "segpipe"), tags={
                "family": fam, "stage": "tune-trial", "eval_split": "tune", "mlflow.parentRunId": parent})
            c.log_batch(trial.info.run_id, params=[Param("hp.lr", str(0.01 * (i + 1)))],
                        metrics=[Metric("val/mIoU", 0.1 * (i + 1), 0, 1)])
    exp = experiment_id(c, "segpipe")
    p = load_params(params_file, base)

    def report() -> tuple[dict, str]:
        chosen, _ = select_runs(train_runs(c, exp), p)
        groups = to_groups(load_records(c, exp, chosen, p))
        trials = tune_trials(c, exp, p)
        tuned = tuned_families(groups, tune_best_configs(c, exp, p), trials)
        s = to_comparison(p, uri, SimpleNamespace(name="segpipe", experiment_id=exp), groups, "cpu", [], [],
                          trials, tuned, {})
        return tuned, render(json.loads(json.dumps(s)))

    run("lraspp", "train")  # params.yaml's train.lr (0.01): not what the tune found
    run("deeplabv3", "train", "train.lr=0.012345")  # the tuned lr, but not the tuned atrous rates
    tuned, md = report()
    assert tuned == {} and "## Hyper-parameter search (Ray Tune)" in md  # trials exist and are shown ...
    assert "†" not in md and "tuned by `segpipe tune`" not in md  # ... but no family is marked tuned
    run("lraspp", "train", "train.lr=0.05")  # `segpipe tune --apply`, then train
    run("deeplabv3", "train", "train.lr=0.012345", "families.deeplabv3.options={atrous_rates: [6, 12, 18]}",
        options={"atrous_rates": [6, 12, 18]})
    tuned, md = report()
    assert tuned == {"lraspp": "tune", "deeplabv3": "tune"}
    assert "| lraspp † |" in md and "| deeplabv3 † |" in md
    assert "lraspp: tuned by `segpipe tune`, trials selected on the `tune` split, not on `val`" in md
