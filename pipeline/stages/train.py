"""Train one family with Ray Train (DDP), tracked in MLflow.

Trains families.<--family> (or train.model) on <data.dir>/shards with ray.num_workers Ray Train
workers (gloo on CPU, NCCL on GPUs); starts a local Ray unless ray.address / RAY_ADDRESS names a
cluster. Evaluates every train.eval_every epochs (confusion matrix all-reduced over workers),
checkpoints every epoch under ray.storage_path (train.resume continues the latest run), logs params,
per-epoch metrics, per-class IoU, confusion matrix, prediction grid and the model to MLflow, and
writes <models_dir>/<family>-seed<N>.pt and <reports_dir>/metrics/<family>-seed<N>.json (--seed N
overrides `seed`; DVC's train matrix runs every family x seeds). --all trains every family x seed at
once on the Ray cluster, each its own TorchTrainer packed by Ray's resources, with the same runs and
outputs (progress lines prefixed family/seedN; a failed run is named, the others finish).
"""

# How it works (developer notes):
# `segpipe train`: Ray Train (TorchTrainer) data-parallel training of one family, tracked in MLflow.
#
# The driver validates everything first (bad params never start Ray), creates the MLflow run and
# hands its id to Ray. Each worker reads a disjoint part of the shards and runs the training step of
# pipeline.training.engine; the confusion matrix is all-reduced before any metric is computed. Rank 0
# checkpoints every epoch (model, optimizer, scheduler, scaler, epoch) through Ray Train; a
# controller callback logs each reported epoch to MLflow and prints one progress line, so the
# metric history follows the checkpoints (a restarted worker group never logs an epoch twice).
# At the end the driver logs the confusion matrix, a prediction grid and the model, and writes the
# DVC outputs: <models_dir>/<family>-seed<N>.pt, <reports_dir>/metrics/<family>-seed<N>.json and
# <family>-seed<N>_epochs.csv.
#
# The work lives in pipeline.training (setup, worker, checkpoint, job, progress, outputs) and
# pipeline.tracking.train; this module holds the flags and the command's result lines.

from __future__ import annotations

import time

from pipeline.config import Params
from pipeline.errors import UserError

def add_arguments(parser) -> None:
    parser.add_argument("--family", help="a key of `families` in params.yaml (fcn, deeplabv3, lraspp, unet); "
                                         "without it train.model / train.model_options are trained")
    parser.add_argument("--seed", type=int, default=None,
                        help="overrides `seed` for this run (DVC's train matrix passes each of `seeds`); "
                             "outputs are named <family>-seed<N>")
    parser.add_argument("--all", action="store_true",
                        help="train every family x seed of params.yaml concurrently on the Ray cluster "
                             "(ray.address / RAY_ADDRESS, else a local Ray), each its own TorchTrainer, "
                             "packed by ray.num_workers x ray.cpus_per_worker (+ GPU); same outputs as one by one")


def _done_line(name: str, s: dict) -> str:
    return (f"[{name}] done: val mIoU {s.get('mIoU', float('nan')):.3f}, pixel acc {s.get('pixel_acc', float('nan')):.3f} "
            f"in {s['train_seconds']:.0f}s (MLflow run {s['mlflow_run_id']})")


def run(p: Params, args) -> int:
    if getattr(args, "all", False):
        return run_all(p, args)
    if args.seed is not None:
        if args.seed < 0:
            raise UserError(f"seed must be >= 0, got {args.seed} (--seed)")
        p = p.model_copy(update={"seed": args.seed})
    from pipeline.training.job import train

    summary = train(p, family=args.family, progress=not args.quiet)
    print(_done_line(summary["family"], summary))
    return 0


def run_all(p: Params, args) -> int:
    if args.family or args.seed is not None:
        raise UserError("--all trains every family x seed of params.yaml: drop --family / --seed "
                        "(or narrow families / seeds with -S)")
    from pipeline.training.job import train_all

    started = time.time()
    outcomes = train_all(p, progress=not args.quiet)
    print(f"train --all: {sum(not o.error for o in outcomes)}/{len(outcomes)} runs finished in "
          f"{time.time() - started:.0f}s", flush=True)
    for o in outcomes:
        if o.summary:
            print(f"  {o.name:<22} val mIoU {o.summary.get('mIoU', float('nan')):.3f}  "
                  f"{o.summary['train_seconds']:.0f}s  MLflow run {o.summary['mlflow_run_id']}")
        else:
            print(f"  {o.name:<22} FAILED: {o.error}")
    failed = [o for o in outcomes if o.error]
    if failed:
        # exit 2 when every failure was bad input (as `segpipe train` exits 2), else 1
        err = UserError(f"{len(failed)} of {len(outcomes)} runs failed: "
                        + "; ".join(f"{o.name}: {o.error}" for o in failed))
        err.exit_code = 2 if all(o.exit_code == 2 for o in failed) else 1
        raise err
    return 0
