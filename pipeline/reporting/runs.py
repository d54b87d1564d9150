"""The train runs a report averages: one record per MLflow run, one group per family, and the
like-with-like rule that decides which seeds are the same experiment.

Pure: works on run objects as MLflow returns them (``r.info`` / ``r.data``) without importing MLflow;
the searches that fetch them live in :mod:`pipeline.tracking.report`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


from pipeline.config import Params
from pipeline.data.voc import VOC_CLASSES
from pipeline.tracking.records import NOT_A_SETTING, NOT_TRAINING, RunRecord, parse_param

__all__ = ["Group", "NOT_A_SETTING", "RunRecord", "mean_std", "missing_runs", "parse_param", "select_runs", "to_groups", "trained_with"]

def mean_std(vals: list[float]) -> dict:
    if not vals:
        return {"mean": None, "std": None, "n": 0, "min": None, "max": None}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "min": min(vals), "max": max(vals)}


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
        return mean_std([r.metric(name) for r in self.runs if r.metric(name) is not None])

    def per_class(self) -> dict[str, float | None]:
        out = {}
        for cls in VOC_CLASSES:
            vals = [r.metrics[f"val/iou/{cls}"] for r in self.runs if f"val/iou/{cls}" in r.metrics]
            out[cls] = statistics.fmean(vals) if vals else None
        return out


def to_groups(records: list[tuple[str, list[RunRecord]]]) -> list[Group]:
    """tracking.report.load_records' (family, records) pairs -> one Group each."""
    return [Group(family=fam, model=recs[0].model, runs=recs) for fam, recs in records]


def run_setting(params: dict, tags: dict) -> dict[str, str]:
    """What makes a train run the experiment it is, all but the seed: model and its options, the
    schedule and optimiser, data split and augmentation, global batch (workers x per-worker batch,
    also listed as ``global_batch``) and the profile (tag) it was trained under."""
    setting = {k: v for k, v in params.items() if not k.startswith(NOT_TRAINING) or k == "train.model_options"}
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


def _candidates(runs: list, p: Params, leave) -> dict[str, list]:
    """family -> [(seed, run)] of the runs that may be averaged (newest first); others go to ``leave``."""
    by_family: dict[str, list] = {}
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
    return by_family


def select_runs(runs: list, p: Params) -> tuple[dict[tuple[str, int], object], list[str]]:
    """The train runs the report averages, per family one per seed, and why the others were left out.

    ``runs``: the FINISHED train runs, newest first (:func:`pipeline.tracking.report.train_runs`).
    Candidates: runs whose model is the family's configured one, whose seed is in ``seeds`` and whose
    data source is the current one. Like with like: the seeds averaged for a family share every
    training setting but the seed (``run_setting``). Candidates are grouped by setting (the newest
    run per seed in each group); the group with the most seeds wins (ties: the one with the newest
    run). Every run of another setting is left out, named with the keys that differ from the
    averaged setting, never averaged."""
    left: dict[str, int] = {}
    differing: list[str] = []

    def leave(why: str) -> None:
        left[why] = left.get(why, 0) + 1

    chosen: dict[tuple[str, int], object] = {}
    for fam, cands in _candidates(runs, p, leave).items():
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


def missing_runs(chosen: dict, p: Params) -> list[str]:
    """``<family> seed <n>`` for every family x seed of params.yaml without a run to average."""
    return [f"{fam} seed {s}" for fam in p.families for s in p.seeds if (fam, s) not in chosen]


# ------------------------------------------------------------------ tuned or not (issue 16)


def _same_value(logged, best) -> bool:
    """A run's logged param against a tune's ``best.<key>`` (written as people read it: floats at 4
    significant digits, tuples in parentheses, ``n/a`` for an option that does not apply)."""
    def norm(v):
        if v is None or v in ("n/a", "None"):
            return None
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("(") and text.endswith(")"):
                text = "[" + text[1:-1] + "]"
            v = parse_param(text)
        if isinstance(v, (list, tuple)):
            return tuple(norm(x) for x in v)
        if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
            return f"{float(v):.4g}"
        return v

    return norm(logged) == norm(best)


def trained_with(run: RunRecord, best: dict[str, str], option_defaults: dict) -> bool:
    """Whether ``run`` was trained with a tune's best config. ``best``: the tune parent run's ``best.*``
    params without the prefix (``model`` plus each searched key); ``option_defaults``: the model's
    options and their defaults (seg_models ``model_info``). A searched option is compared with the
    run's ``model_options.<key>`` (the default when the run did not set it); any other key but
    ``variant`` (which ``model`` already decides) with the run's ``train.<key>``."""
    if "model" in best and best["model"] != run.model:
        return False
    for key, value in best.items():
        if key in ("model", "variant"):
            continue
        if key in option_defaults:
            logged = run.params.get(f"model_options.{key}", option_defaults[key])
        else:
            logged = run.params.get(f"train.{key}")
        if not _same_value(logged, value):
            return False
    return True
