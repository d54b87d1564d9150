"""The comparison of the families as data: every pair against the seed spread, the params that differ
between families, which families were tuned, and the whole comparison dict written as
comparison.json (from which :mod:`pipeline.reporting.markdown` renders comparison.md alone)."""

from __future__ import annotations

import time

from pipeline.config import Params
from pipeline.data.loaders import load_manifest, shard_dir
from pipeline.data.voc import VOC_CLASSES
from pipeline.errors import UserError
from pipeline.reporting.runs import NOT_A_SETTING, Group, mean_std, trained_with
from pipeline.profiles import profile_anchors, profile_source
from pipeline.stats import beyond_spread
from seg_models import model_info

METRICS = ("mIoU", "pixel_acc", "mean_acc", "fwIoU")
SHARED_KEYS = ("train.epochs", "train.batch_size", "ray.num_workers", "train.crop_size", "train.eval_size",
               "train.lr", "train.momentum", "train.weight_decay", "train.poly_power", "train.warmup_epochs",
               "train.scale_min", "train.scale_max", "train.amp", "train.aux_weight")


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
            verdict, spread = beyond_spread(gap, sa["std"], sb["std"])
            out.append({"better": a.family, "worse": b.family, "delta_mIoU": gap, "spread": spread, "verdict": verdict})
    return out


def differing_params(groups: list[Group]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """(key -> family -> value for the params that differ between families, key -> value of the
    shared ones worth quoting)."""
    runs = [r for g in groups for r in g.runs]
    keys = sorted(set().union(*(r.params for r in runs))) if runs else []
    differ, shared = {}, {}
    for k in keys:
        if k.startswith(NOT_A_SETTING):
            continue
        per_fam = {g.family: sorted({r.params.get(k, "–") for r in g.runs}) for g in groups}
        values = {v for vs in per_fam.values() for v in vs}
        if len(values) > 1:
            differ[k] = {f: " / ".join(vs) for f, vs in per_fam.items()}
        else:
            shared[k] = next(iter(values))
    return differ, shared


def data_counts(p: Params) -> str:
    try:
        m = load_manifest(p.data.dir)
        return ", ".join(f"{info['count']} {split}" for split, info in m["splits"].items()) + " images"
    except (UserError, ValueError, KeyError, TypeError, OSError):
        return f"counts unknown (no readable manifest.json in {shard_dir(p.data.dir)})"


def report_anchors(p: Params, groups: list[Group]) -> dict[str, dict]:
    """family -> the published figure its runs' profile (tag `profile`, else params `profile`) aims at,
    with the profile's source and the settings that still differ from it (`source.differs`)."""
    out = {}
    for g in groups:
        name = g.best.tags.get("profile") or p.profile
        a = profile_anchors(name).get(g.family)
        if a is not None:
            source = profile_source(name)
            out[g.family] = {**a, "profile": name, "recipe": source.get("name", ""),
                             "differs": list(source.get("differs") or [])}
    return out


def _split_of(trials: list[dict]) -> str:
    """The split trials selected on: val if any of them did (the optimistic case is the one to name)."""
    splits = [t["eval_split"] for t in trials]
    return "val" if "val" in splits else (splits[0] if splits else "val")


def tuned_families(groups: list[Group], tunes: dict[str, list[dict]], trials: list[dict]) -> dict[str, str]:
    """family -> the split its tune's trials selected on, for the families whose averaged runs were
    ALL trained with the best config of one of the family's finished tunes (newest first; tunes as
    tracking.report.tune_best_configs gives them). Trials existing is not enough (issue 16): a family
    trained with other values than the tune found is not marked."""
    out = {}
    for g in groups:
        for tune in tunes.get(g.family, []):
            try:
                defaults = model_info(tune["best"]["model"])["defaults"]
            except ValueError:  # a model this checkout no longer has
                continue
            if all(trained_with(r, tune["best"], defaults) for r in g.runs):
                mine = [t for t in trials if t.get("parent_run_id") == tune["run_id"]]
                out[g.family] = _split_of(mine or [t for t in trials if t["label"] == g.family])
                break
    return out


def _family(g: Group) -> dict:
    return {
        "family": g.family, "model": g.model, "options": g.best.options, "seeds": g.seeds,
        **{m: g.stat(m) for m in METRICS},
        "per_class_iou": g.per_class(),
        **{k: g.measured.get(k) for k in ("params_M", "gflops", "latency_ms", "latency_p90_ms")},
        "note": g.measured.get("note"),  # why params/GFLOPs/latency are missing
        "eval_size": g.measured.get("size") or g.best.eval_size,
        "train_seconds": mean_std([r.train_seconds for r in g.runs]),
        "img_per_s": mean_std([r.img_per_s for r in g.runs if r.img_per_s is not None]),
        "best_run_id": g.best.run_id,
        "registered": g.registered,
        "runs": [{"run_id": r.run_id, "seed": r.seed, **{m: r.metric(m) for m in METRICS},
                  "per_class_iou": {c: r.metrics.get(f"val/iou/{c}") for c in VOC_CLASSES},
                  "train_seconds": r.train_seconds, "img_per_s": r.img_per_s,
                  "epochs": len(r.history.get("val/mIoU", [])), "git_commit": r.tags.get("git_commit"),
                  "eval_split": r.tags.get("eval_split", "val"), "model_id": r.model_id} for r in g.runs],
    }


def to_comparison(p: Params, uri: str, exp, groups: list[Group], dev_name: str, left_out: list[str],
                  missing: list[str], trials: list[dict], tuned: dict[str, str], figs: dict[str, str],
                  ablations: dict[str, dict] | None = None) -> dict:
    """The comparison.json content: everything comparison.md shows. ``exp``: the MLflow experiment
    (name, experiment_id); ``tuned``: :func:`tuned_families`; ``figs``: figures.draw's name -> path."""
    differ, shared = differing_params(groups)
    size = next((g.measured["size"] for g in groups if "size" in g.measured), p.train.eval_size)
    return {
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "tracking_uri": uri, "experiment": exp.name, "experiment_id": exp.experiment_id,
        "data": {"source": str(p.data.source), "counts": data_counts(p), "dir": str(p.data.dir)},
        "seeds": p.seeds,
        "latency": {"device": dev_name, "batch": 1, "precision": "fp32", "warmup": p.report.latency_warmup,
                    "repeats": p.report.latency_repeats, "statistic": "median", "size": size},
        "families": [_family(g) for g in groups],
        "comparisons": comparisons(groups),
        "differing_params": differ,
        "shared_params": {k: shared[k] for k in SHARED_KEYS if k in shared},
        "missing_runs": missing,
        "left_out_runs": left_out,
        "anchors": report_anchors(p, groups),
        # family -> the split its tune trials selected on, only for families whose runs used the tuned values
        "tuned_families": tuned,
        "tune_trials": trials,
        "tune_ablations": ablations or {},  # family -> its newest tune's ablation tables (pipeline.tuning.ablation)
        "figures": figs,
    }
