"""Compare the families from the MLflow runs: comparison.md/.json + PNGs, register the best models.

Reads the runs from the MLflow tracking store (not local files): per family of params.yaml and seed
of `seeds`, the latest FINISHED stage=train run of the configured model. Writes
<reports_dir>/comparison.md, comparison.json and figures/: val mIoU (mean +- std over seeds),
pixel/mean accuracy, params, GFLOPs and latency (measured here: batch 1, eval size, on
report.device), training time, img/s, per-class IoU, mIoU vs params/latency, mIoU per epoch,
confusion matrices, a qualitative grid on the same val images, Ray Tune plots when tune trials
exist, which differences are inside the seed spread, and how it was produced. Registers each
family's best run as segpipe-<family> with alias `best` (report.register_best).
"""

# How it works (developer notes):
# Runs come from MLflow, not from local files: for every family of params.yaml and every seed of
# `seeds`, the latest FINISHED run tagged stage=train with the family's configured model (and the
# current data source), like with like: the seeds averaged for a family share every training setting
# but the seed (`select_runs`); runs of another setting are listed as left out with the keys that differ. From each run: final val metrics, per-class IoU, the val mIoU history, the
# confusion matrix artifact, training time (run start to end) and throughput. The report then loads
# each family's best logged model to measure what the runs do not hold: parameters, GFLOPs and
# latency (batch 1, eval size, on the local device), and the predictions of the qualitative grid.
# It registers each family's best run as `segpipe-<family>` with alias `best`.
#
# Outputs (in train.reports_dir): comparison.md, comparison.json and figures/*.png, written to a
# temporary place and moved in only when complete.

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.data.voc import NUM_CLASSES, VOC_CLASSES

METRICS = ("mIoU", "pixel_acc", "mean_acc", "fwIoU")
FIGURES = "figures"
# params that are the same thing in every run, or bookkeeping: never listed as "differing"
_NOT_A_SETTING = ("seed", "seeds", "families.", "mlflow.", "report.", "train.models_dir", "train.reports_dir",
                  "ray.storage_path", "ray.address", "data.dir", "train.resume")


# ------------------------------------------------------------------------------------ runs


def parse_param(text: str):
    """An MLflow param string back to a value ("[12, 24, 36]" -> list, "True" -> True); else the text."""
    import yaml

    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if text in ("True", "False"):
        return text == "True"
    return text if v is None or isinstance(v, dict) else v


@dataclass
class RunRecord:
    """What the report uses of one MLflow train run."""

    run_id: str
    family: str
    model: str
    seed: int
    start_ms: int
    end_ms: int
    metrics: dict
    params: dict
    tags: dict
    history: dict = field(default_factory=dict)  # metric -> [(step, value)]
    cm: np.ndarray | None = None
    model_id: str | None = None

    @property
    def train_seconds(self) -> float:
        return max(0.0, (self.end_ms - self.start_ms) / 1000.0)

    @property
    def img_per_s(self) -> float | None:
        vals = [v for _, v in self.history.get("train/img_per_s", [])]
        return statistics.fmean(vals) if vals else None

    def metric(self, name: str) -> float | None:
        v = self.metrics.get(f"val/{name}")
        return None if v is None or not math.isfinite(v) else float(v)

    @property
    def options(self) -> dict:
        return {k[len("model_options."):]: parse_param(v) for k, v in sorted(self.params.items())
                if k.startswith("model_options.")}

    @property
    def eval_size(self) -> int:
        return int(self.params.get("train.eval_size", 0) or 0)


@dataclass
class Group:
    """One family (its configured model) and its runs, one per seed."""

    family: str
    model: str
    runs: list[RunRecord]
    measured: dict = field(default_factory=dict)  # params, gflops, latency
    registered: dict | None = None

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def best(self) -> RunRecord:
        return max(self.runs, key=lambda r: (r.metric("mIoU") if r.metric("mIoU") is not None else -1.0, -r.seed))

    def stat(self, name: str) -> dict:
        vals = [r.metric(name) for r in self.runs if r.metric(name) is not None]
        return _mean_std(vals)

    def per_class(self) -> dict[str, float | None]:
        out = {}
        for cls in VOC_CLASSES:
            vals = [r.metrics[f"val/iou/{cls}"] for r in self.runs if f"val/iou/{cls}" in r.metrics]
            out[cls] = statistics.fmean(vals) if vals else None
        return out


def _mean_std(vals: list[float]) -> dict:
    if not vals:
        return {"mean": None, "std": None, "n": 0, "min": None, "max": None}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "min": min(vals), "max": max(vals)}


def open_store(p: Params):
    """(client, tracking uri, experiment) or a UserError saying what to run first."""
    from pipeline.tracking import client, resolve_tracking_uri

    uri = resolve_tracking_uri(p.mlflow.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow store at {uri[len('sqlite:///'):]}: train first "
                        "(`dvc repro` or `segpipe train --family <name>`) (mlflow.tracking_uri)")
    from pipeline.tracking import preflight

    preflight(p)  # unreachable / refused / unauthorised / read-only: one error line within seconds
    c = client(uri)
    try:
        exp = c.get_experiment_by_name(p.mlflow.experiment)
    except Exception as exc:  # unreachable server, broken database
        raise UserError(f"cannot read the MLflow store {uri}: {exc.__class__.__name__}: {str(exc)[:200]} "
                        "(mlflow.tracking_uri)") from None
    if exp is None:
        raise UserError(f"no experiment {p.mlflow.experiment!r} in {uri}: train first (mlflow.experiment)")
    return c, uri, exp


def search_all(c, experiment_id: str, filter_string: str) -> list:
    out, token = [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                             order_by=["attributes.start_time DESC"], page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


# params that are bookkeeping for a train run (where files go, how fast data loads, what `segpipe tune`
# would search): never part of the setting that decides whether two seeds are the same experiment
_NOT_TRAINING = _NOT_A_SETTING + ("tune.", "hp.", "train.model", "train.loader_workers", "train.max_failures",
                                  "train.sample_images", "train.eval_every", "data.voc_", "data.sbd_",
                                  "data.download_timeout_s", "data.workers", "data.row_group_rows",
                                  "data.shard_max_mb", "data.tune_split", "ray.cpus_per_worker")


def run_setting(params: dict, tags: dict) -> dict[str, str]:
    """What makes a train run the experiment it is, all but the seed: model and its options, the
    schedule and optimiser, data split and augmentation, global batch (workers x per-worker batch,
    also listed as ``global_batch``) and the profile (tag) it was trained under."""
    setting = {k: v for k, v in params.items() if not k.startswith(_NOT_TRAINING) or k == "train.model_options"}
    setting.pop("train.model_options", None)  # the run's model_options.* hold the options it really used
    try:
        setting["global_batch"] = str(int(params["ray.num_workers"]) * int(params["train.batch_size"]))
    except (KeyError, ValueError):
        pass
    setting["profile"] = tags.get("profile", "")
    return setting


def _diff(a: dict, b: dict) -> list[str]:
    """Keys whose value differs between two settings, as ``key=value (averaged: value)``."""
    return [f"{k}={a.get(k, '–')} (averaged: {b.get(k, '–')})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def select_runs(c, experiment_id: str, p: Params) -> tuple[dict[tuple[str, int], object], list[str]]:
    """The train runs the report averages, per family one per seed, and why the others were left out.

    Candidates: FINISHED train runs whose model is the family's configured one, whose seed is in
    ``seeds`` and whose data source is the current one. Like with like: the seeds averaged for a family
    share every training setting but the seed (``run_setting``). Candidates are grouped by setting
    (the newest run per seed in each group); the group with the most seeds wins (ties: the one with
    the newest run). Every run of another setting is left out, named with the keys that differ from
    the averaged setting, never averaged."""
    runs = search_all(c, experiment_id, "tags.stage = 'train' and attributes.status = 'FINISHED'")
    left: dict[str, int] = {}
    differing: list[str] = []
    by_family: dict[str, list] = {}

    def leave(why: str) -> None:
        left[why] = left.get(why, 0) + 1

    for r in runs:  # newest first
        t = r.data.tags
        fam, model = t.get("family", ""), t.get("model", "")
        try:
            seed = int(t.get("seed", ""))
        except ValueError:
            leave("no seed tag")
            continue
        if fam not in p.families:
            leave("family not in params.yaml families")
        elif model != p.families[fam].model:
            leave("another model than families.<family>.model")
        elif seed not in p.seeds:
            leave("seed not in params.yaml seeds")
        elif t.get("data_source") != str(p.data.source):
            leave("another data.source")
        else:
            by_family.setdefault(fam, []).append((seed, r))

    chosen: dict[tuple[str, int], object] = {}
    for fam, cands in by_family.items():
        groups: dict[tuple, dict[int, object]] = {}  # setting -> seed -> newest run
        settings: dict[tuple, dict] = {}
        order: dict[tuple, int] = {}  # setting -> position of its newest run (0 = newest overall)
        for i, (seed, r) in enumerate(cands):
            setting = run_setting(dict(r.data.params), dict(r.data.tags))
            key = tuple(sorted(setting.items()))
            settings[key] = setting
            order.setdefault(key, i)
            seeds = groups.setdefault(key, {})
            if seed in seeds:
                leave("older run of the same family, seed and setting")
            else:
                seeds[seed] = r
        best = min(groups, key=lambda k: (-len(groups[k]), order[k]))
        for seed, r in groups[best].items():
            chosen[(fam, seed)] = r
        for key, seeds in groups.items():
            if key == best:
                continue
            for seed, r in sorted(seeds.items()):
                differing.append(f"{fam} seed {seed} (run {r.info.run_id[:8]}): another setting than the "
                                 f"{len(groups[best])} averaged seed(s): {', '.join(_diff(settings[key], settings[best]))}")
    return chosen, [f"{n} × {why}" for why, n in left.items()] + differing


def logged_models(c, experiment_id: str) -> dict[str, str]:
    """source run id -> model id of its (latest) READY logged model."""
    out: dict[str, tuple[int, str]] = {}
    token = None
    while True:
        page = c.search_logged_models(experiment_ids=[experiment_id], page_token=token, max_results=100)
        for m in page:
            if str(m.status).endswith("READY") and m.source_run_id:
                if m.source_run_id not in out or m.creation_timestamp > out[m.source_run_id][0]:
                    out[m.source_run_id] = (m.creation_timestamp, m.model_id)
        token = page.token
        if not token:
            return {k: v[1] for k, v in out.items()}


def read_confusion(c, run_id: str) -> np.ndarray | None:
    import csv

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(run_id, "confusion_matrix.csv", tmp)
        except Exception:
            return None
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
    try:
        cm = np.array([[float(v) for v in row[1:]] for row in rows])
    except ValueError:
        return None
    return cm if cm.shape == (NUM_CLASSES, NUM_CLASSES) else None


def load_records(c, experiment_id: str, chosen: dict, p: Params) -> list[Group]:
    models = logged_models(c, experiment_id)
    groups = []
    for fam in p.families:
        recs = []
        for seed in p.seeds:
            r = chosen.get((fam, seed))
            if r is None:
                continue
            rec = RunRecord(run_id=r.info.run_id, family=fam, model=r.data.tags["model"], seed=seed,
                            start_ms=r.info.start_time or 0, end_ms=r.info.end_time or r.info.start_time or 0,
                            metrics=dict(r.data.metrics), params=dict(r.data.params), tags=dict(r.data.tags),
                            model_id=models.get(r.info.run_id))
            for key in ("val/mIoU", "train/img_per_s"):
                rec.history[key] = sorted((m.step, m.value) for m in c.get_metric_history(rec.run_id, key))
            rec.cm = read_confusion(c, rec.run_id)
            recs.append(rec)
        if recs:
            groups.append(Group(family=fam, model=recs[0].model, runs=recs))
    return groups


# ------------------------------------------------------------------------------ measurements


def load_logged_model(uri: str, run_id: str, device):
    """A train run's model from its checkpoint artifact (weights_only=True: no pickle of a module is
    ever loaded), eval mode, on `device`."""
    from pipeline.stages.predict import load_run_checkpoint

    model, _ = load_run_checkpoint(uri, run_id, f"run {run_id}")
    return model.to(device).eval()


def measure(model, size: int, device, warmup: int, repeats: int) -> dict:
    """params (M), GFLOPs (FlopCounterMode: a multiply-add is 2 FLOPs) and latency (median ms of
    `repeats` timed forward passes after `warmup`), batch 1, size x size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode():
        with counter:
            model(x)
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1000.0)
    return {"params_M": sum(t.numel() for t in model.parameters()) / 1e6,
            "gflops": counter.get_total_flops() / 1e9,
            "latency_ms": statistics.median(times),
            "latency_p90_ms": float(np.percentile(times, 90)),
            "size": size}


# ---------------------------------------------------------------------------------- registry


def register_best(c, group: Group) -> dict | None:
    """segpipe-<family> -> a version from the best run's logged model, alias `best` on it (a
    version already aliased `best` for the same run is kept, so re-running adds no version)."""
    from mlflow.exceptions import MlflowException

    best = group.best
    if not best.model_id:
        return None
    name = f"segpipe-{group.family}"
    try:
        current = c.get_model_version_by_alias(name, "best")
        if current.run_id == best.run_id:
            return {"name": name, "version": int(current.version), "alias": "best", "run_id": best.run_id, "new": False}
    except MlflowException:
        pass
    try:
        c.create_registered_model(name, description=f"Best {group.family} run by val mIoU, registered by `segpipe report`.",
                                  tags={"family": group.family})
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "ALREADY_EXISTS" not in str(exc.error_code):
            raise
    mv = c.create_model_version(name, source=f"models:/{best.model_id}", run_id=best.run_id, model_id=best.model_id,
                                tags={"family": group.family, "model": best.model, "seed": str(best.seed),
                                      "val_mIoU": f"{best.metric('mIoU') or float('nan'):.4f}"},
                                description=f"{best.model}, seed {best.seed}, val mIoU {best.metric('mIoU') or float('nan'):.4f}")
    c.set_registered_model_alias(name, "best", mv.version)
    return {"name": name, "version": int(mv.version), "alias": "best", "run_id": best.run_id, "new": True}


# ------------------------------------------------------------------------------------ tune


def tune_trials(c, experiment_id: str, p: Params) -> list[dict]:
    """Finished Ray Tune trials (stage=tune-trial) of the configured families: label, config of
    the knobs that vary between trials of a family, final val mIoU."""
    runs = [r for r in search_all(c, experiment_id, "tags.stage = 'tune-trial'")
            if r.data.tags.get("family") in p.families and "val/mIoU" in r.data.metrics]
    trials = []
    for fam in p.families:
        rs = [r for r in runs if r.data.tags["family"] == fam]
        if not rs:
            continue
        keys = set().union(*(r.data.params for r in rs))
        tuned = sorted(k for k in keys if k.startswith("hp."))  # what `segpipe tune` searched, when it says so
        varying = [k for k in (tuned or sorted(keys)) if not k.startswith(_NOT_A_SETTING)
                   and len({r.data.params.get(k) for r in rs}) > 1]
        for r in rs:
            trials.append({"label": fam, "run_id": r.info.run_id, "mIoU": r.data.metrics["val/mIoU"],
                           "status": r.info.status, "eval_split": r.data.tags.get("eval_split", "val"),
                           "config": {k: parse_param(r.data.params[k]) for k in varying if k in r.data.params}})
    return trials


# ---------------------------------------------------------------------------------- formatting


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pm(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _opts(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def comparisons(groups: list[Group]) -> list[dict]:
    """Every pair of families by mean val mIoU: is the gap larger than the spread of the seeds
    (sum of the two sample standard deviations)?"""
    ranked = sorted((g for g in groups if g.stat("mIoU")["mean"] is not None),
                    key=lambda g: -g.stat("mIoU")["mean"])
    out = []
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            sa, sb = a.stat("mIoU"), b.stat("mIoU")
            gap = sa["mean"] - sb["mean"]
            if sa["std"] is None or sb["std"] is None:
                verdict, spread = "one seed: spread unknown", None
            else:
                spread = sa["std"] + sb["std"]
                verdict = "inside the seed spread" if gap <= spread else "larger than the seed spread"
            out.append({"better": a.family, "worse": b.family, "delta_mIoU": gap, "spread": spread, "verdict": verdict})
    return out


def differing_params(groups: list[Group]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """(key -> family -> value for the params that differ between families, key -> value of the
    shared ones worth quoting)."""
    runs = [r for g in groups for r in g.runs]
    keys = sorted(set().union(*(r.params for r in runs))) if runs else []
    differ, shared = {}, {}
    for k in keys:
        if k.startswith(_NOT_A_SETTING):
            continue
        per_fam = {g.family: sorted({r.params.get(k, "–") for r in g.runs}) for g in groups}
        values = {v for vs in per_fam.values() for v in vs}
        if len(values) > 1:
            differ[k] = {f: " / ".join(vs) for f, vs in per_fam.items()}
        else:
            shared[k] = next(iter(values))
    return differ, shared


SHARED_KEYS = ("train.epochs", "train.batch_size", "ray.num_workers", "train.crop_size", "train.eval_size",
               "train.lr", "train.momentum", "train.weight_decay", "train.poly_power", "train.warmup_epochs",
               "train.scale_min", "train.scale_max", "train.amp", "train.aux_weight")


def data_counts(p: Params) -> str:
    from pipeline.data.loaders import load_manifest, shard_dir

    try:
        m = load_manifest(p.data.dir)
        return ", ".join(f"{info['count']} {split}" for split, info in m["splits"].items()) + " images"
    except (UserError, ValueError, KeyError, TypeError, OSError):
        return f"counts unknown (no readable manifest.json in {shard_dir(p.data.dir)})"


# ------------------------------------------------------------------------------------ report


def build(p: Params, progress: bool = True) -> dict:
    """Collect, measure, register, draw and write. Returns the comparison.json content."""
    import torch

    from pipeline.reporting import figures as reporting

    from pipeline.tracking import fluent_uri

    say = print if progress else (lambda *a, **k: None)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    c, uri, exp = open_store(p)
    chosen, left_out = select_runs(c, exp.experiment_id, p)
    if not chosen:
        raise UserError(f"no finished train runs in MLflow experiment {p.mlflow.experiment!r} ({uri}) for families "
                        f"{sorted(p.families)} with seeds {p.seeds} on data.source={p.data.source}: "
                        "run `dvc repro` or `segpipe train --family <name> --seed <n>` first")
    groups = load_records(c, exp.experiment_id, chosen, p)
    from pipeline.tracking import mark_in_report

    mark_in_report(c, exp.experiment_id, [r.info.run_id for r in chosen.values()])  # UI: tags.in_report = '1'
    missing = [f"{fam} seed {s}" for fam in p.families for s in p.seeds if (fam, s) not in chosen]
    say(f"report: {len(chosen)} runs ({len(groups)} families × seeds {p.seeds}) from {uri}")

    from pipeline.system import device_name, pick_device

    device = pick_device(p.report.device, "report.device")
    dev_name = device_name(device)
    samples = []
    if p.report.sample_images:
        try:
            samples = reporting.val_samples(p.data.dir, p.report.sample_images)
        except Exception as exc:  # no shards here: the grid is skipped, the report says so
            say(f"report: no qualitative grid ({exc.__class__.__name__}: {exc})")
    predictions: dict[str, list[np.ndarray]] = {}
    for g in groups:
        best = g.best
        if not best.model_id:
            g.measured = {"note": "no logged model in MLflow"}
            continue
        try:
            model = load_logged_model(uri, best.run_id, device)
        except Exception as exc:  # artifacts deleted or moved: the report goes on without measurements
            g.measured = {"note": f"logged model not loadable: {exc.__class__.__name__}"}
            print(f"report: warning: {g.family}: cannot load the logged model of run {best.run_id} "
                  f"({exc.__class__.__name__}: {str(exc)[:150]}); no params/GFLOPs/latency for it", file=sys.stderr)
            continue
        size = best.eval_size or p.train.eval_size
        g.measured = measure(model, size, device, p.report.latency_warmup, p.report.latency_repeats)
        say(f"report: {g.family:<10} {g.measured['params_M']:.2f} M params, {g.measured['gflops']:.2f} GFLOPs, "
            f"{g.measured['latency_ms']:.1f} ms/image at {size}x{size} on {device.type}")
        if samples:
            predictions[g.family] = [reporting.predict_mask(model, img, size) for _, img, _ in samples]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if p.report.register_best:
        for g in groups:
            with fluent_uri(uri):  # the registry store resolves models:/ through the default tracking URI
                g.registered = register_best(c, g)
            if g.registered:
                say(f"report: {g.registered['name']}@best -> version {g.registered['version']} "
                    f"(run {g.registered['run_id']}{', new' if g.registered['new'] else ''})")

    trials = tune_trials(c, exp.experiment_id, p)
    out_dir = Path(p.train.reports_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".comparison-", dir=out_dir))
    try:
        figs = draw(groups, samples, predictions, trials, staging / FIGURES, dev_name)
        summary = to_json(p, uri, exp, groups, dev_name, left_out, missing, trials, figs)
        (staging / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
        (staging / "comparison.md").write_text(to_markdown(p, uri, exp, groups, summary, figs, trials))
        publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"report: wrote {out_dir / 'comparison.md'}, {out_dir / 'comparison.json'} and {len(figs)} figures in "
        f"{out_dir / FIGURES}")
    return summary


def publish(staging: Path, out_dir: Path) -> None:
    """Move the finished report into place: figures/ as a whole, then the JSON, then the Markdown."""
    figures, old = out_dir / FIGURES, out_dir / f".{FIGURES}-old-{os.getpid()}"
    if figures.exists():
        figures.rename(old)
    (staging / FIGURES).rename(figures)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(staging / "comparison.json", out_dir / "comparison.json")
    os.replace(staging / "comparison.md", out_dir / "comparison.md")


def draw(groups, samples, predictions, trials, fig_dir: Path, dev_name: str) -> dict[str, str]:
    """Every PNG; returns name -> path relative to the report."""
    from pipeline.reporting import figures as reporting

    fig_dir.mkdir(parents=True)
    figs: dict[str, str] = {}

    def rel(path) -> str:
        return f"{FIGURES}/{Path(path).name}"

    measured = [g for g in groups if "latency_ms" in g.measured and g.stat("mIoU")["mean"] is not None]
    if measured:
        pts = [{"label": g.family, "y": g.stat("mIoU")["mean"], "yerr": g.stat("mIoU")["std"], "n": len(g.runs)}
               for g in measured]
        size = measured[0].measured["size"]
        figs["miou_vs_params"] = rel(reporting.tradeoff_png(
            [{**pt, "x": g.measured["params_M"]} for pt, g in zip(pts, measured)], "parameters (millions)",
            fig_dir / "miou_vs_params.png", "val mIoU vs model size"))
        figs["miou_vs_latency"] = rel(reporting.tradeoff_png(
            [{**pt, "x": g.measured["latency_ms"]} for pt, g in zip(pts, measured)],
            f"latency (ms / image, batch 1, {size}×{size})",
            fig_dir / "miou_vs_latency.png", f"val mIoU vs latency\n{_short_device(dev_name)}"))
    curves = {}
    for g in groups:
        by_epoch: dict[int, list[float]] = {}
        for r in g.runs:
            for step, v in r.history.get("val/mIoU", []):
                by_epoch.setdefault(step, []).append(v)
        if by_epoch:
            ep = sorted(by_epoch)
            curves[g.family] = {"epochs": ep, "mean": [statistics.fmean(by_epoch[e]) for e in ep],
                                "lo": [min(by_epoch[e]) for e in ep], "hi": [max(by_epoch[e]) for e in ep], "n": len(g.runs)}
    if curves:
        figs["miou_per_epoch"] = rel(reporting.curves_png(curves, fig_dir / "miou_per_epoch.png", "val mIoU per epoch"))
    per_class = {g.family: g.per_class() for g in groups}
    cms = [r.cm for g in groups for r in g.runs if r.cm is not None]
    if cms:  # the classes with ground-truth pixels in val (a class only ever predicted has IoU 0)
        in_val = sum(cms).sum(1) > 0
        classes = [c for i, c in enumerate(VOC_CLASSES) if in_val[i]]
        why = "absent from the val ground truth"
    else:
        classes = [c for c in VOC_CLASSES if any(pc[c] is not None for pc in per_class.values())]
        why = "absent from val and predictions"
    if classes:
        omitted = NUM_CLASSES - len(classes)
        figs["per_class_iou"] = rel(reporting.per_class_png(
            classes, {f: [pc[c] for c in classes] for f, pc in per_class.items()}, fig_dir / "per_class_iou.png",
            "val IoU per class" + (f" ({omitted} classes {why} left out)" if omitted else "")))
    for g in groups:
        cms = [r.cm for r in g.runs if r.cm is not None]
        if cms:
            figs[f"confusion_{g.family}"] = rel(reporting.confusion_png(
                sum(cms), fig_dir / f"confusion_{g.family}.png",
                title=f"{_name(g)}: val confusion matrix, row-normalised\n"
                      + (f"(summed over {len(cms)} seeds)" if len(cms) > 1 else f"(seed {g.runs[0].seed})")))
    if samples and predictions:
        by = {g.family: g for g in groups}
        labelled = {f"{fam} (seed {by[fam].best.seed})\n{by[fam].model}": preds for fam, preds in predictions.items()}
        figs["qualitative"] = rel(reporting.comparison_grid(
            samples, labelled, fig_dir / "qualitative.png",
            "Same val images, every family's best run (VOC palette)"))
    if trials:
        knobs = sorted({k for t in trials for k in t["config"]})
        if knobs:
            figs["tune"] = rel(reporting.tune_png(trials, knobs, fig_dir / "tune.png",
                                                   f"Ray Tune trials: val mIoU per tuned setting ({len(trials)} trials)"))
    return figs


def _name(g: Group) -> str:
    return g.family if g.model == g.family else f"{g.family} ({g.model})"


def _short_device(name: str) -> str:
    return name.split(" (torch")[0]


def report_anchors(p: Params, groups: list[Group]) -> dict[str, dict]:
    """family -> the published figure its runs' profile (tag `profile`, else params `profile`) aims at."""
    from pipeline.stages.quickstart import profile_anchors

    out = {}
    for g in groups:
        name = g.best.tags.get("profile") or p.profile
        a = profile_anchors(name).get(g.family)
        if a is not None:
            out[g.family] = {**a, "profile": name}
    return out


def to_json(p, uri, exp, groups, dev_name, left_out, missing, trials, figs) -> dict:
    differ, shared = differing_params(groups)
    fams = []
    for g in groups:
        fams.append({
            "family": g.family, "model": g.model, "options": g.best.options, "seeds": g.seeds,
            **{m: g.stat(m) for m in METRICS},
            "per_class_iou": g.per_class(),
            **{k: g.measured.get(k) for k in ("params_M", "gflops", "latency_ms", "latency_p90_ms")},
            "eval_size": g.measured.get("size") or g.best.eval_size,
            "train_seconds": _mean_std([r.train_seconds for r in g.runs]),
            "img_per_s": _mean_std([r.img_per_s for r in g.runs if r.img_per_s is not None]),
            "best_run_id": g.best.run_id,
            "registered": g.registered,
            "runs": [{"run_id": r.run_id, "seed": r.seed, **{m: r.metric(m) for m in METRICS},
                      "per_class_iou": {c: r.metrics.get(f"val/iou/{c}") for c in VOC_CLASSES},
                      "train_seconds": r.train_seconds, "img_per_s": r.img_per_s,
                      "epochs": len(r.history.get("val/mIoU", [])), "git_commit": r.tags.get("git_commit"),
                      "model_id": r.model_id} for r in g.runs],
        })
    return {
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "tracking_uri": uri, "experiment": exp.name, "experiment_id": exp.experiment_id,
        "data": {"source": str(p.data.source), "counts": data_counts(p)},
        "seeds": p.seeds,
        "latency": {"device": dev_name, "batch": 1, "precision": "fp32", "warmup": p.report.latency_warmup,
                    "repeats": p.report.latency_repeats, "statistic": "median"},
        "families": fams,
        "comparisons": comparisons(groups),
        "differing_params": differ,
        "shared_params": {k: shared[k] for k in SHARED_KEYS if k in shared},
        "missing_runs": missing,
        "left_out_runs": left_out,
        "anchors": report_anchors(p, groups),
        # family -> the split its tune trials selected on (val if any of its trials did)
        "tuned_families": {f: "val" if any(t["eval_split"] == "val" for t in trials if t["label"] == f)
                           else next(t["eval_split"] for t in trials if t["label"] == f)
                           for f in dict.fromkeys(t["label"] for t in trials)},
        "tune_trials": trials,
        "figures": figs,
    }


def to_markdown(p, uri, exp, groups, s, figs, trials) -> str:
    L: list[str] = []
    names = " vs ".join({"fcn": "FCN", "deeplabv3": "DeepLabV3", "lraspp": "LRASPP", "unet": "UNet"}.get(g.family, g.family)
                        for g in groups)
    L += [f"# Semantic segmentation on PASCAL VOC: {names}", ""]
    L += [f"Generated {s['generated_at']} by `segpipe report` from the MLflow experiment `{exp.name}` "
          f"(`{uri}`): {sum(len(g.runs) for g in groups)} train runs, seeds {', '.join(map(str, p.seeds))}. "
          f"Data: `{p.data.source}`, {s['data']['counts']}.", ""]
    if s["missing_runs"]:
        L += [f"**Not trained yet** (no finished run in MLflow): {', '.join(s['missing_runs'])}.", ""]

    # ---- main table
    best_miou = max((g.stat("mIoU")["mean"] for g in groups if g.stat("mIoU")["mean"] is not None), default=None)
    size = next((g.measured["size"] for g in groups if "size" in g.measured), p.train.eval_size)
    L += ["## Results", ""]
    anchors = s.get("anchors", {})
    L += [f"| family | model | key options | val mIoU | published anchor | pixel acc | mean acc | params (M) | GFLOPs @{size}² | "
          "latency (ms/img) | train time | img/s | seeds | MLflow run(s) | git commit |",
          "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    tuned = s.get("tuned_families", {})
    for g in groups:
        m = g.stat("mIoU")
        miou = _pm(m)
        if best_miou is not None and m["mean"] == best_miou and len(groups) > 1:
            miou = f"**{miou}**"
        commits = sorted({(r.tags.get("git_commit") or "unknown")[:8] for r in g.runs})
        L.append("| " + " | ".join([
            g.family + (" †" if g.family in tuned else ""), f"`{g.model}`", _opts(g.best.options), miou,
            (f"{anchors[g.family]['miou']} ({anchors[g.family]['profile']})" if g.family in anchors else "–"),
            _pm(g.stat("pixel_acc")), _pm(g.stat("mean_acc")),
            _f(g.measured.get("params_M"), 2), _f(g.measured.get("gflops"), 2), _f(g.measured.get("latency_ms"), 1),
            _duration(statistics.fmean([r.train_seconds for r in g.runs])),
            _f(_mean_std([r.img_per_s for r in g.runs if r.img_per_s is not None])["mean"], 1),
            ", ".join(map(str, g.seeds)), " ".join(f"`{r.run_id[:8]}`" for r in g.runs), ", ".join(commits)]) + " |")
    notes = [f"{g.family}: {g.measured['note']}" for g in groups if "note" in g.measured]
    if notes:
        L += ["", "Not measured — " + "; ".join(notes) + "."]
    L += ["", f"val metrics: mean ± sample standard deviation over the seeds (a single seed shows no ±); bold = best "
          f"mean. Params and GFLOPs are counted on the logged model at the eval size (batch 1; a multiply-add counts "
          f"as 2 FLOPs, torch `FlopCounterMode`). Latency: median of {p.report.latency_repeats} timed forward passes "
          f"after {p.report.latency_warmup} warm-up ones, batch 1, {size}×{size}, fp32, measured by the report on "
          f"**{s['latency']['device']}**. Train time: wall clock of the MLflow run (Ray start-up, evaluation and "
          "logging included), mean over seeds. img/s: training images per second summed over the Ray workers, mean "
          "over epochs and seeds. Full run ids are in the [runs table](#runs) and comparison.json.", ""]
    for fam, a in anchors.items():
        L += [f"- Anchor of {fam} (profile `{a['profile']}`): {a.get('figure', '')} — {a.get('source', '')}."
              + (f" Differs from this run: trained on {a['dataset']} (here `{p.data.source}`)"
                 if a.get("dataset") and a["dataset"] != str(p.data.source) else " Same training data")
              + (", same evaluation split (VOC2012 val)." if a.get("split") == "VOC2012 val"
                 and str(p.data.source) in ("voc2012", "voc2012_aug")
                 else f", evaluated on {a.get('split', '?')} (here the `val` split of `{p.data.source}`).")
              + " The anchor is in %, the table's mIoU a fraction."]
    if anchors:
        L.append("")
    eval_splits = sorted({r.tags.get("eval_split", "val") for g in groups for r in g.runs})
    L += [f"Split: every number above is measured on the `{'`, `'.join(eval_splits)}` split (the train runs' "
          "`eval_split` tag); models train on the whole `train` split."
          + "".join(f" † {fam}: tuned by `segpipe tune`, trials selected on the `{split}` split"
                    + (" (the published split: this number is optimistically biased; set data.tune_split)."
                       if split in eval_splits else f", not on `{'`, `'.join(eval_splits)}`.")
                    for fam, split in tuned.items()), ""]

    # ---- differences vs seed spread
    comps = s["comparisons"]
    if comps:
        L += ["### Are the differences larger than the seed spread?", ""]
        if all(c["spread"] is None for c in comps):
            L += [f"Only one seed per family: the spread over seeds is unknown, so no difference below can be called "
                  f"real. Train more seeds (`seeds` in params.yaml) to tell.", ""]
        L += ["| comparison | Δ val mIoU | seed spread (std₁ + std₂) | verdict |", "|---|---:|---:|---|"]
        for c in comps:
            L.append(f"| {c['better']} > {c['worse']} | {c['delta_mIoU']:.3f} | {_f(c['spread'])} | {c['verdict']} |")
        inside = [c for c in comps if c["verdict"] == "inside the seed spread"]
        larger = [c for c in comps if c["verdict"] == "larger than the seed spread"]
        n = min(len(g.runs) for g in groups)
        if inside and not larger:
            L += ["", f"Every difference is inside the spread of the seeds: with {n} seeds per family, no family is "
                  "shown to be better than another."]
        elif inside:
            L += ["", "Larger than the seed spread: " + "; ".join(f"{c['better']} over {c['worse']}" for c in larger)
                  + ". Inside it (not a real difference at this number of seeds): "
                  + "; ".join(f"{c['better']} vs {c['worse']}" for c in inside) + "."]
        elif larger:
            L += ["", "Every difference is larger than the spread of the seeds."]
        L.append("")
    for key, alt in (("miou_vs_params", "val mIoU vs parameters"), ("miou_vs_latency", "val mIoU vs latency")):
        if key in figs:
            L.append(f"![{alt}]({figs[key]})")
    L.append("")

    # ---- per class
    L += ["## Per-class IoU", "", "val IoU per VOC class, mean over seeds; **bold** = best family for the class; "
          "– = no pixel of the class in the val ground truth nor in that family's predictions (IoU undefined).", ""]
    L += ["| class | " + " | ".join(g.family for g in groups) + " |", "|---|" + "---:|" * len(groups)]
    pcs = {g.family: g.per_class() for g in groups}
    for cls in VOC_CLASSES:
        vals = {f: pcs[f][cls] for f in pcs}
        top = max((v for v in vals.values() if v is not None), default=None)
        mark = top is not None and top > 0 and len(groups) > 1
        cells = [("**" + _f(v) + "**") if (mark and v == top) else _f(v) for v in vals.values()]
        L.append(f"| {cls} | " + " | ".join(cells) + " |")
    L.append("| **mIoU** | " + " | ".join(_pm(g.stat("mIoU")) for g in groups) + " |")
    L.append("")
    if "per_class_iou" in figs:
        L += [f"![val IoU per class]({figs['per_class_iou']})", ""]

    # ---- curves, confusion, qualitative
    if "miou_per_epoch" in figs:
        L += ["## Training curves", "", f"![val mIoU per epoch]({figs['miou_per_epoch']})", ""]
    conf = [(g.family, figs[f"confusion_{g.family}"]) for g in groups if f"confusion_{g.family}" in figs]
    if conf:
        L += ["## Confusion matrices", "", "Row-normalised (each row: where the pixels of that true class went), "
              "summed over seeds.", ""]
        L += [f"![{fam} confusion matrix]({path})" for fam, path in conf] + [""]
    L += ["## Qualitative comparison", ""]
    if "qualitative" in figs:
        L += ["The same val images for every family (each family's best seed): image | ground truth | predictions, "
              "in the VOC palette.", "", f"![qualitative comparison]({figs['qualitative']})", ""]
    else:
        L += [f"No grid: no val shards under `{p.data.dir}` (run `segpipe preprocess`) or report.sample_images = 0.", ""]

    # ---- tune
    if trials:
        L += ["## Hyper-parameter search (Ray Tune)", ""]
        L += ["| family | trials | selected on | best trial mIoU | best config | run |", "|---|---:|---|---:|---|---|"]
        for fam in dict.fromkeys(t["label"] for t in trials):
            ts = [t for t in trials if t["label"] == fam]
            b = max(ts, key=lambda t: t["mIoU"])
            cfg = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["config"].items()) or "–"
            L.append(f"| {fam} | {len(ts)} | `{b['eval_split']}` | {b['mIoU']:.3f} | {cfg} | `{b['run_id'][:8]}` |")
        L.append("")
        if "tune" in figs:
            L += [f"![tune trials]({figs['tune']})", ""]

    # ---- registry
    reg = [g for g in groups if g.registered]
    if reg:
        L += ["## Model Registry", "", "Each family's best run (highest val mIoU over seeds) is registered in the "
              "MLflow Model Registry with the alias `best`:", ""]
        L += ["| family | registered model | version | val mIoU | seed | run |", "|---|---|---:|---:|---:|---|"]
        for g in reg:
            L.append(f"| {g.family} | `models:/{g.registered['name']}@best` | {g.registered['version']} | "
                     f"{_f(g.best.metric('mIoU'))} | {g.best.seed} | `{g.best.run_id}` |")
        L += ["", f"Predict with one: `segpipe predict --model models:/{reg[0].registered['name']}@best IMAGE... "
              "--out predictions/`.", ""]

    # ---- provenance
    L += ["## How this was produced", ""]
    L += [f"- **Data**: `data.source={p.data.source}`, {s['data']['counts']}; images padded to {size}×{size} for "
          "evaluation (void pixels ignored)."]
    L += [f"- **Seeds**: {', '.join(map(str, p.seeds))} (`seeds` in params.yaml; DVC's train matrix runs every "
          "family × seed). Runs per family: " + ", ".join(f"{g.family} {len(g.runs)}" for g in groups) + "."]
    L += [f"- **Runs**: for each family and seed, the latest FINISHED MLflow run tagged `stage=train` with the "
          "family's configured model and the current data source; the seeds averaged for a family share every "
          "training setting but the seed (model options, global batch, schedule, data split, profile)."
          + (" Left out (never averaged):" if s["left_out_runs"] else "")]
    L += [f"  - {why}" for why in s["left_out_runs"]]
    commits = sorted({r.tags.get("git_commit", "unknown") for g in groups for r in g.runs})
    L += [f"- **Code**: git commit{'s' * (len(commits) > 1)} {', '.join(f'`{c}`' for c in commits)}."]
    L += ["- **Shared settings**: " + ", ".join(f"`{k}={v}`" for k, v in s["shared_params"].items()) + "."]
    L.append("")
    if s["differing_params"]:
        L += ["Params that differ between families (from each run's MLflow params):", ""]
        L += ["| param | " + " | ".join(g.family for g in groups) + " |", "|---|" + "---|" * len(groups)]
        for k, per in s["differing_params"].items():
            L.append(f"| `{k}` | " + " | ".join(per.get(g.family, "–") for g in groups) + " |")
        L.append("")
    L += ['<a id="runs"></a>', "", "| family | seed | MLflow run | val mIoU | epochs | train time |", "|---|---:|---|---:|---:|---:|"]
    for g in groups:
        for r in g.runs:
            L.append(f"| {g.family} | {r.seed} | `{r.run_id}` | {_f(r.metric('mIoU'))} | "
                     f"{len(r.history.get('val/mIoU', []))} | {_duration(r.train_seconds)} |")
    L += ["", "Browse them with `segpipe ui` (http://127.0.0.1:5000), rebuild this file with `segpipe report` "
          "(or `dvc repro report`).", ""]
    return "\n".join(L)


def run(p: Params, args) -> int:
    build(p, progress=not args.quiet)
    return 0
