"""Compare the families from the MLflow runs: comparison.md/.json + PNGs, register the best models.

Reads the runs from the MLflow tracking store (not local files): per family of params.yaml and seed
of `seeds`, the latest FINISHED stage=train run of the configured model. Writes
<reports_dir>/comparison.md, comparison.json and figures/: val mIoU (mean +- std over seeds),
pixel/mean accuracy, params, GFLOPs and latency (measured here: batch 1, eval size, on
report.device), training time, img/s, per-class IoU, mIoU vs params/latency, mIoU per epoch,
confusion matrices, a qualitative grid on the same val images, Ray Tune plots when tune trials
exist, which differences are inside the seed spread, and how it was produced. Registers each
family's best run as segpipe-<family> with alias `best` (report.register_best). A family is
marked † (tuned by `segpipe tune`) only when its averaged runs were trained with the best config of
one of its finished tunes (the tune parent run's best.* params), not merely because trials exist.
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
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.config import Params
from pipeline.errors import UserError

log = logging.getLogger(__name__)


def _collect(p: Params, say):
    """(client, uri, experiment, groups, left out, missing) from the tracking store; tags the chosen runs."""
    from pipeline.reporting.runs import missing_runs, select_runs, to_groups
    from pipeline.tracking import mark_in_report
    from pipeline.tracking.report import load_records, open_store, train_runs

    c, uri, exp = open_store(p)
    chosen, left_out = select_runs(train_runs(c, exp.experiment_id), p)
    if not chosen:
        raise UserError(f"no finished train runs in MLflow experiment {p.mlflow.experiment!r} ({uri}) for families "
                        f"{sorted(p.families)} with seeds {p.seeds} on data.source={p.data.source}: "
                        "run `dvc repro` or `segpipe train --family <name> --seed <n>` first")
    groups = to_groups(load_records(c, exp.experiment_id, chosen, p))
    mark_in_report(c, exp.experiment_id, [r.info.run_id for r in chosen.values()])  # UI: tags.in_report = '1'
    say(f"report: {len(chosen)} runs ({len(groups)} families × seeds {p.seeds}) from {uri}")
    return c, uri, exp, groups, left_out, missing_runs(chosen, p)


def _samples(p: Params, say) -> list:
    from pipeline.training.inference import val_samples

    if not p.report.sample_images:
        return []
    try:
        return val_samples(p.data.dir, p.report.sample_images)
    except Exception as exc:  # no shards here: the grid is skipped, the report says so
        say(f"report: no qualitative grid ({exc.__class__.__name__}: {exc})")
        return []


def _register(c, uri: str, groups, say) -> None:
    from pipeline.tracking import fluent_uri
    from pipeline.tracking.report import register_best

    for g in groups:
        with fluent_uri(uri):  # the registry store resolves models:/ through the default tracking URI
            g.registered = register_best(c, g)
        if g.registered:
            say(f"report: {g.registered['name']}@best -> version {g.registered['version']} "
                f"(run {g.registered['run_id']}{', new' if g.registered['new'] else ''})")


FIGURES_LEGACY = ("../comparison.json",)  # figures/ of a report written before pipeline.storage.OWNER_MARK


def _write(out_dir: Path, draw, summarise) -> tuple[dict, dict]:
    """Draw the figures and write comparison.json / comparison.md in a staging folder, then move them
    into out_dir (figures/ as a whole, then the JSON, then the Markdown). Returns (comparison, figures)."""
    from pipeline.figures.report import FIGURES
    from pipeline.reporting.markdown import render
    from pipeline.storage import check_owned, swap_in

    out_dir.mkdir(parents=True, exist_ok=True)
    check_owned(out_dir / FIGURES, "train.reports_dir", FIGURES_LEGACY)
    staging = Path(tempfile.mkdtemp(prefix=".comparison-", dir=out_dir))
    try:
        figs = draw(staging / FIGURES)
        summary = summarise(figs)
        (staging / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
        (staging / "comparison.md").write_text(render(summary))
        swap_in(staging / FIGURES, out_dir / FIGURES, "train.reports_dir", FIGURES_LEGACY)
        os.replace(staging / "comparison.json", out_dir / "comparison.json")
        os.replace(staging / "comparison.md", out_dir / "comparison.md")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary, figs


def build(p: Params, progress: bool = True) -> dict:
    """Collect, measure, register, draw and write. Returns the comparison.json content."""
    from pipeline.figures import report as figures
    from pipeline.reporting.compare import to_comparison, tuned_families
    from pipeline.reporting.measure import measure_groups
    from pipeline.system import device_name, pick_device
    from pipeline.storage import check_owned
    from pipeline.tracking.report import tune_best_configs, tune_trials

    check_owned(Path(p.train.reports_dir) / figures.FIGURES, "train.reports_dir", FIGURES_LEGACY)  # before any work
    say = log.info if progress else (lambda *a, **k: None)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    c, uri, exp, groups, left_out, missing = _collect(p, say)
    device = pick_device(p.report.device, "report.device")
    dev_name = device_name(device)
    samples = _samples(p, say)
    predictions = measure_groups(groups, uri, device, p, samples, progress)
    if p.report.register_best:
        _register(c, uri, groups, say)
    trials = tune_trials(c, exp.experiment_id, p)
    tunes = tune_best_configs(c, exp.experiment_id, p)
    tuned = tuned_families(groups, tunes, trials)
    ablations = {fam: ts[0]["ablation"] for fam, ts in tunes.items() if ts[0]["ablation"]}  # the newest tune's
    out_dir = Path(p.train.reports_dir)
    summary, figs = _write(
        out_dir, lambda fig_dir: figures.draw(groups, samples, predictions, trials, fig_dir, dev_name),
        lambda figs: to_comparison(p, uri, exp, groups, dev_name, left_out, missing, trials, tuned, figs, ablations))
    say(f"report: wrote {out_dir / 'comparison.md'}, {out_dir / 'comparison.json'} and {len(figs)} figures in "
        f"{out_dir / figures.FIGURES}")
    return summary


def run(p: Params, args) -> int:
    build(p, progress=not args.quiet)
    return 0
