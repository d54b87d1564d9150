"""The result of a family's tune: one row per trial of each phase (phase, seed, status, epochs, val
mIoU, values; its MLflow run tagged with the outcome and closed), the optimiser phase's best values,
the architecture phase's ablation tables (pipeline.tuning.ablation) and the adopted config, and
<reports_dir>/tune/<family>/ with trials.csv, ablation.json / ablation.md, best_config.json (what
--apply merges: only the values adopted), metrics.json (the DVC metric: a few numbers, one `dvc exp
show` column each), best_params.yaml (a full params file: `segpipe train -p ...`) and plots/, swapped in
whole; the same files on the parent MLflow run; the tables printed at the end."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
from pathlib import Path

import yaml

from pipeline import storage
from pipeline.config import Params
from pipeline.figures.tune import ablation_plot, make_plots
from pipeline.tracking import tune as tune_runs
from pipeline.display import show
from pipeline.tuning import ablation
from pipeline.tuning.phases import ARCHITECTURE, OPTIMISER, SEED_KEY, point_key, point_of, values_of
from pipeline.tuning.space import METRIC, TRAIN_KEYS, Space, apply_values, decode
from seg_models.summary import model_cost

log = logging.getLogger(__name__)
FILES = ("trials.csv", "best_params.yaml", "best_config.json", "metrics.json")
ABLATION_FILES = ("ablation.json", "ablation.md")
# what metrics.json keeps of the summary: numbers only (names and ids live in best_config.json)
METRIC_KEYS = ("best_val_mIoU", "best_val_mIoU_std", "best_epochs", "trials", "completed", "early_stopped", "errored",
               "tune_seconds")
ABLATION_TAG = "ablation"  # the tables on the parent run (compact JSON) for `segpipe report`


TUNE_LEGACY = ("best_config.json",)  # a result folder written before pipeline.storage.OWNER_MARK existed


def out_dir(p: Params, family: str) -> Path:
    return Path(p.train.reports_dir) / "tune" / family


def trial_number(trial_id: str) -> int:
    """Tune's trial ids end in a running index (3e4a1_00002 -> trial 3)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) + 1 if tail.isdigit() else 0


def _status(trial, stopped_at) -> str:
    if trial.status == "ERROR":
        return "error"
    if trial.status == "TERMINATED":
        return "early_stopped" if stopped_at else "completed"
    return trial.status.lower()


def rows(p: Params, space: Space, phase: str, trials, uri: str, parent_run_id: str) -> list[dict]:
    """One row per trial of a phase (status completed / early_stopped / error / pending / running),
    its child run tagged with the outcome and closed."""
    children = tune_runs.trial_runs(uri, p.mlflow.experiment, parent_run_id)
    out = []
    for trial in sorted(trials, key=lambda tr: tr.trial_id):
        last = trial.last_result or {}
        run = children.get(trial.trial_id)
        # the child run's history is the record of the epochs trained: Tune may have missed the report
        # of an epoch in flight when it was interrupted or stopped the trial
        history = [] if run is None else tune_runs.metric_history(uri, run.info.run_id, METRIC)
        final = history[-1][1] if history else last.get(METRIC)
        stopped_at = run.data.tags.get("tune.asha_stopped_at") if run is not None else None
        status = _status(trial, stopped_at)
        values = decode(space, trial.config)
        model, options, train = apply_values(space, values)
        if run is not None and status in ("completed", "early_stopped", "error"):
            tune_runs.close_trial(uri, run, status)
        logged = run.data.metrics if run is not None else last
        out.append({
            "phase": phase, "seed": int(trial.config.get(SEED_KEY, p.seed)), "point": point_of(space, values),
            "trial": trial_number(trial.trial_id), "trial_id": trial.trial_id, "status": status,
            "epochs": history[-1][0] if history else int(last.get("epoch") or 0),
            "stopped_at": int(stopped_at) if stopped_at else None,
            "val_mIoU": float(final) if final is not None else None,
            "best_val_mIoU": max((v for _, v in history), default=final),
            "val_pixel_acc": logged.get("val/pixel_acc"), "train_loss": logged.get("train/loss"),
            "model": model, "options": options, "train": {**{k: getattr(p.train, k) for k in TRAIN_KEYS}, **train},
            "values": values, "mlflow_run_id": run.info.run_id if run is not None else "",
            "error": error_text(trial) if status == "error" else "",
        })
    return out


def error_text(trial) -> str:
    """The line of a failed trial's error that says what went wrong (segpipe's own, else the last *Error)."""
    try:
        err = trial.get_error()
        text = str(err) if err else ""
    except Exception:  # the error file may be gone
        text = ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "segpipe:" in ln or "Error" in ln:
            return ln[:300]
    return (lines[-1] if lines else "trial failed")[:300]


def best_train_values(rows: list[dict]) -> dict:
    """The optimiser values of the optimiser phase's best trial (final val mIoU, then epochs)."""
    ok = [r for r in rows if r["status"] != "error" and r["val_mIoU"] is not None]
    best = max(ok, key=lambda r: (r["val_mIoU"], r["epochs"]))
    return {k: v for k, v in best["values"].items() if k in TRAIN_KEYS}


def _costs(space: Space, crop: int) -> dict[str, dict]:
    """point key -> {params, gflops} of each architecture grid point at the training crop."""
    from pipeline.tuning.phases import points

    out = {}
    for point in points(space):
        model, options, _ = apply_values(space, values_of(space, point))
        out[point_key(point)] = model_cost(model, crop, options)
    return out


def summarize(p: Params, phases: dict[str, Space], rows: dict[str, list[dict]], parent_run_id: str, name: str,
              seconds: float) -> tuple[dict, dict, dict, dict | None]:
    """(best row, metrics.json summary, best_config.json, ablation result or None)."""
    everything = [r for ph in rows.values() for r in ph]
    ok = [r for r in everything if r["status"] != "error" and r["val_mIoU"] is not None]
    fixed = best_train_values(rows[OPTIMISER]) if OPTIMISER in rows else {}
    result, std = None, None
    if ARCHITECTURE in phases:
        space = phases[ARCHITECTURE]
        result = ablation.tables(space, rows[ARCHITECTURE], _costs(space, p.train.crop_size))
        mine = [r for r in ok if r["phase"] == ARCHITECTURE and point_key(r["point"]) == point_key(result["chosen"])]
        best = max(mine, key=lambda r: (r["val_mIoU"], r["epochs"]))
        values = {**fixed, **ablation.chosen_values(space, result)}
        model, options, train = apply_values(space, values_of(space, result["chosen"]))
        score, std = result["chosen_mean"], result["chosen_std"]
    else:
        space = phases[OPTIMISER]
        best = max((r for r in ok if r["phase"] == OPTIMISER), key=lambda r: (r["val_mIoU"], r["epochs"]))
        values, model, options, train, score = fixed, best["model"], best["options"], best["train"], best["val_mIoU"]
    counts = {s: sum(r["status"] == s for r in everything) for s in ("completed", "early_stopped", "error")}
    summary = {
        "family": space.family, "best_val_mIoU": score, "best_epochs": best["epochs"],
        "trials": len(everything), "completed": counts["completed"], "early_stopped": counts["early_stopped"],
        "errored": counts["error"], "best_trial": best["trial_id"], "best_model": model,
        "best_config": {k: v if isinstance(v, (int, float, str)) else show(v) for k, v in values.items()},
        "mlflow_parent_run_id": parent_run_id, "mlflow_best_run_id": best["mlflow_run_id"],
        "ray_experiment": name, "tune_seconds": round(seconds, 1),
        **({"best_val_mIoU_std": std} if std is not None else {}),
    }
    searched = {k for ph in phases.values() for k in ph.searched}
    best_config = {"family": space.family, "model": model, "options": options,
                   "train": {k: v for k, v in train.items() if k in searched or k in space.train},
                   "values": values, "val_mIoU": score, "val_mIoU_std": std, "epochs": best["epochs"],
                   "notes": result["notes"] if result else [],
                   "trial_id": best["trial_id"], "mlflow_run_id": best["mlflow_run_id"],
                   "mlflow_parent_run_id": parent_run_id, "ray_experiment": name}
    return best, summary, best_config, result


def finish(p: Params, phases: dict[str, Space], rows: dict[str, list[dict]], uri: str, parent_run_id: str, name: str,
           seconds: float) -> dict:
    """Write <reports_dir>/tune/<family>/ (complete or not at all), log it on the parent run, print the tables."""
    family = next(iter(phases.values())).family
    best, summary, best_config, result = summarize(p, phases, rows, parent_run_id, name, seconds)
    final = out_dir(p, family)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=final.parent))
    try:
        (tmp / "plots").mkdir()
        write_csv(rows, phases, tmp / "trials.csv")
        (tmp / "best_config.json").write_text(json.dumps(best_config, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps({k: summary[k] for k in METRIC_KEYS if k in summary}, indent=2) + "\n")
        (tmp / "best_params.yaml").write_text(best_params_yaml(p, family, best_config))
        files, tags = [tmp / f for f in FILES], {"best_trial_id": best["trial_id"], "best_run_id": best["mlflow_run_id"]}
        plots = [q for ph, sp in phases.items() for q in make_plots(rows[ph], sp, tmp / "plots")]
        table = result or {"axes": {}, "notes": ["no architecture entry searched: the optimiser phase only"]}
        (tmp / "ablation.json").write_text(json.dumps(table, indent=2) + "\n")  # always: a DVC output
        (tmp / "ablation.md").write_text("\n".join(ablation.markdown(family, table)))
        files += [tmp / f for f in ABLATION_FILES]
        if result is not None:
            plots.append(ablation_plot(result, family, phases[ARCHITECTURE], tmp / "plots" / "ablation.png"))
            tags[ABLATION_TAG] = ablation.compact(result)
        metrics = {"best/val_mIoU": summary["best_val_mIoU"], "tune/trials": summary["trials"],
                   "tune/completed": summary["completed"], "tune/early_stopped": summary["early_stopped"],
                   "tune/errored": summary["errored"], "tune/seconds": seconds}
        tune_runs.log_result(
            uri, parent_run_id, metrics=metrics,
            params={**{f"best.{k}": show(v) for k, v in best_config["values"].items()}, "best.model": best_config["model"]},
            tags=tags, files=files, plots=plots)
        storage.swap_in(tmp, final, "train.reports_dir", TUNE_LEGACY)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_tables(rows, phases, best_config, result, final)
    return summary


def write_csv(rows: dict[str, list[dict]], phases: dict[str, Space], path: Path) -> None:
    hps = list(dict.fromkeys(h for ph in phases.values() for h in ph.searched))
    cols = ["phase", "seed", "trial", "trial_id", "status", "epochs", "stopped_at", "val_mIoU", "best_val_mIoU",
            "val_pixel_acc", "train_loss", "model", *hps, "mlflow_run_id", "error"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for phase in phases:
            for r in _by_miou(rows[phase]):
                vals = {**r, **{h: json.dumps(r["values"].get(h)) if isinstance(r["values"].get(h), (list, dict))
                                else r["values"].get(h) for h in hps}}
                w.writerow(["" if vals.get(c) is None else vals.get(c) for c in cols])


def _by_miou(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: -(r["val_mIoU"] if r["val_mIoU"] is not None else -1))


def best_params_yaml(p: Params, family: str, best: dict) -> str:
    """The adopted config as a full params file (the family's own train block only)."""
    d = p.model_dump(mode="json")
    d["families"][family] = {"model": best["model"], "options": best["options"],
                             "train": {**p.families[family].train, **best["train"]}}  # never the shared train block
    d["tune"]["resume"] = False
    where = out_dir(p, family)
    spread = f" ± {best['val_mIoU_std']:.4f}" if best.get("val_mIoU_std") is not None else ""
    head = (f"# segpipe tune: the {family} config the tune adopted (val mIoU {best['val_mIoU']:.4f}{spread} on the "
            f"selection split, MLflow run {best['mlflow_run_id']}) merged into the params it ran with.\n"
            f"# adopted: {', '.join(f'{k}={show(v)}' for k, v in best['values'].items()) or 'nothing'}\n"
            + "".join(f"# {n}\n" for n in best.get("notes", []))
            + f"# train it:  segpipe train -p {where / 'best_params.yaml'} --family {family}\n"
            f"# or merge it into params.yaml:  segpipe tune --apply --family {family}\n")
    return head + yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=110)


def print_tables(rows: dict[str, list[dict]], phases: dict[str, Space], best: dict, result: dict | None,
                 where: Path) -> None:
    """Each phase's trials by val mIoU, the ablation tables (the command's result: printed), then the
    adopted config (a progress line)."""
    lines = []
    for phase, space in phases.items():
        hps = list(space.searched) + (["seed"] if phase == ARCHITECTURE else [])
        get = (lambda r, h: r["seed"] if h == "seed" else r["values"].get(h))
        widths = {h: max([len(h)] + [len(show(get(r, h))) for r in rows[phase]]) for h in hps}
        lines += [f"{phase} phase:",
                  f"{'trial':>5}  {'status':<13} {'epochs':>6} {'val mIoU':>8}  " + "  ".join(f"{h:<{widths[h]}}" for h in hps)]
        for r in _by_miou(rows[phase]):
            miou = f"{r['val_mIoU']:.3f}" if r["val_mIoU"] is not None else "-"
            lines.append(f"{r['trial']:>5}  {r['status']:<13} {r['epochs']:>6} {miou:>8}  "
                         + "  ".join(f"{show(get(r, h)):<{widths[h]}}" for h in hps))
        lines.append("")
    if result is not None:
        lines += ablation.markdown(best["family"], result)
    print("\n".join(lines), flush=True)
    log.info(f"[{best['family']}] adopted: {best['model']} "
             + (", ".join(f"{k}={show(v)}" for k, v in best["values"].items()) or "the configured values")
             + f" -> val mIoU {best['val_mIoU']:.3f}; wrote {where}/best_params.yaml, metrics.json, trials.csv, plots/")
