"""Ray Tune search per family (ASHA on val/mIoU), nested MLflow runs, best params.

For each family of tune.families (or --family): checks the whole search space of tune.space.<family>
first (model options such as atrous_rates / output_stride / aspp / upsample, `variant` 32s/16s/8s
for FCN, `model`, and lr / weight_decay / momentum; each a {choice|grid|uniform|loguniform} entry or
a fixed value), then runs one trial per config: the TorchTrainer of `segpipe train` for up to
tune.max_epochs epochs, ASHA stopping weak trials on val/mIoU (tune.grace_period,
tune.reduction_factor). Search: random/grid, or Optuna TPE (tune.search_alg). MLflow: a parent run
(stage=tune) with the best config, trials.csv and plots, one child run per trial (stage=tune-trial).
Writes <reports_dir>/tune/<family>/ best_params.yaml (train it: segpipe train -p ... --family F),
best_config.json, metrics.json, trials.csv and plots/. tune.resume continues the latest interrupted
tune (Ctrl-C exits 130); --apply merges the best config into params.yaml without running anything.
"""

# How it works (developer notes):
# The search space lives in params.yaml (`tune.space.<family>.<entry>`): an entry is a model option of
# the family's model (`atrous_rates`, `output_stride`, `aspp`, `upsample`, ...), `model` (a registry
# name of the family), `variant` (a named variant of the family's models, seg_models FAMILIES[f].variants:
# FCN VGG16 32s / 16s / 8s -> fcn32s_vgg16 / fcn16s_vgg16 / fcn8s_vgg16) or an optimiser setting (`lr`, `weight_decay`, `momentum`); its value is
# `{choice: [...]}`, `{grid: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}` or a fixed value.
# The whole space is checked before any trial starts: unknown entries and values that do not build
# (every choice is built on the meta device) are `error: ...`, exit 2.
#
# Each trial is a function trainable that builds the TorchTrainer of `segpipe train` (pipeline.training.job:
# resolve_job / fit / worker.train_loop_per_worker, no second loop) and forwards its per-epoch reports to
# Tune with TuneReportCallback; ASHA stops the weak trials on `val/mIoU` (time attribute: epoch).
# MLflow: one parent run per family and tune (stage=tune) and one nested child run per trial
# (stage=tune-trial, tag mlflow.parentRunId) with the trial's params and per-epoch metrics (logged by
# train's epoch callback). The parent gets the best config, a CSV of all trials and the plots, and
# <reports_dir>/tune/<family>/ gets best_params.yaml (a full params file: `segpipe train -p ...`),
# best_config.json (what `segpipe tune --apply` merges into params.yaml), metrics.json, trials.csv and
# plots/. `tune.resume: true` continues the latest interrupted tune of the family (Tuner.restore).
#
# This module holds the arguments and the order of the steps; the work is in pipeline.tuning (space:
# the search space; runner: the Tuner and the trial; asha: early stopping; results: rows and files;
# apply: --apply), pipeline.tracking.tune (the MLflow runs) and pipeline.figures.tune (plots).

from __future__ import annotations

import logging

from pipeline.config import Params

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--family", help="tune only this family (a key of `families` with a tune.space entry); "
                                         "default: every family in tune.families")
    parser.add_argument("--apply", action="store_true",
                        help="run no trial: merge the best config of the last tune (<reports_dir>/tune/<family>/"
                             "best_config.json) into the params file (-p), comments kept")


def run(p: Params, args) -> int:
    families = [args.family] if args.family else list(p.tune.families)
    if args.apply:
        from pipeline.tuning.apply import apply_best
        from pipeline.tuning.results import out_dir

        changes, notes = apply_best(args.params, p, families)
        for note in notes:
            print(note)
        print(f"{args.params}: " + ("; ".join(changes) if changes else "already holds the adopted config")
              + f" (from {', '.join(str(out_dir(p, f) / 'best_config.json') for f in families)})")
        return 0
    from pipeline import tracking
    from pipeline.data.loaders import verify_shards
    from pipeline.training.job import check_data
    from pipeline.training.resources import check_batches
    from pipeline.storage import check_owned
    from pipeline.tuning.results import TUNE_LEGACY, out_dir
    from pipeline.tuning.runner import check_resources, tune_family
    from pipeline.config import family_params
    from pipeline.tuning.phases import ARCHITECTURE, check_distinct, split
    from pipeline.tuning.space import resolve_space

    spaces = [resolve_space(p, fam) for fam in families]  # the whole space is checked before any trial
    for space in spaces:  # and no two architecture grid points are the same computation
        arch = split(space).get(ARCHITECTURE)
        if arch is not None:
            check_distinct(arch, family_params(p, space.family).train.crop_size)
    for fam in families:  # the result folder each tune replaces at its end: segpipe's, or refused now
        check_owned(out_dir(p, fam), "train.reports_dir", TUNE_LEGACY)
    manifest = check_data(p)
    tracking.preflight(p)  # the store answers and is writable (else one error line), before Ray
    if p.data.verify_shards:
        verify_shards(p.data.dir)  # every shard against manifest.json, before Ray
    check_batches(p, manifest, families)  # each family's trials train on one global batch at least
    check_resources(p)
    for space in spaces:
        s = tune_family(p, space)
        spread = f" ± {s['best_val_mIoU_std']:.3f}" if "best_val_mIoU_std" in s else ""
        log.info(f"[{space.family}] tune done in {s['tune_seconds']:.0f}s: {s['trials']} trials "
                 f"({s['completed']} completed, {s['early_stopped']} stopped early, {s['errored']} failed), adopted "
                 f"config val mIoU {s['best_val_mIoU']:.3f}{spread} (MLflow run {s['mlflow_parent_run_id']})")
    return 0
