"""`train_loop_per_worker`: what every Ray Train worker runs (in `segpipe train` and inside each
Ray Tune trial).

Each worker reads a disjoint part of the shards (pipeline.training.setup.build_loaders), steps
pipeline.training.engine, all-reduces the epoch sums and the confusion matrix through
pipeline.training.dist before any metric is computed, and reports one dict per epoch to Ray
(rank 0 attaches a checkpoint: pipeline.training.checkpoint's state.pt). A NaN / inf loss on any
rank stops every rank at the same step and the run ends without a retry (FAILURE_KEY); the driver
turns the text into one `error:` line (WORKER_ERROR, "loss became NaN at epoch E step S").
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.util
import ray.train.torch
import torch

from pipeline.data.voc import NUM_CLASSES
from pipeline.errors import UserError
from pipeline.training import dist as collective
from pipeline.training import engine
from pipeline.training.checkpoint import load_state, restore_state, save_state
from pipeline.training.metrics import scores
from pipeline.training.setup import Setup, build, build_loaders
from pipeline.training.spec import WorkerSpec

# A worker's error the driver turns into one `error:` line (Ray wraps worker exceptions).
WORKER_ERROR = "segpipe-user-error: "
# A deterministic failure (a non-finite loss, a checkpoint the worker cannot read) is not raised: every
# rank stops at the same point and rank 0 returns {FAILURE_KEY: text}, so Ray Train's FailureConfig
# does not replay it from the last checkpoint (it would fail the same way); pipeline.training.job.fit
# raises it. An exception (a lost worker or node) is still retried.
FAILURE_KEY = "segpipe_failure"
# Reported with every epoch: the hex id of the placement group the workers run in (the tune's
# driver frees a stopped trial's group with it: pipeline.tuning.runner.release_placement_group).
PLACEMENT_GROUP_KEY = "placement_group"


def _restore(s: Setup, device: torch.device) -> tuple[int, dict]:
    """Resume from Ray's latest checkpoint (a restarted worker group, train.resume): (epochs done,
    the epoch history so far)."""
    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0, {}
    with ckpt.as_directory() as d:
        try:
            state = load_state(Path(d) / "state.pt", map_location=device)
        except UserError as exc:  # the driver checked it before Ray started; a swap since then lands here
            return 0, {FAILURE_KEY: f"{WORKER_ERROR}{exc}"}
    return restore_state(s, state), dict(state.get("history") or {})


def _recalibrate(s: Setup, spec: WorkerSpec, train_loader, world: int) -> None:
    """train.bn_recalibrate: fresh BatchNorm statistics before an evaluation, the same on every rank."""
    device = s.opts.device
    batches = int(collective.all_reduce(torch.tensor([min(spec.bn_recalibrate, len(train_loader))]), device, "min")[0])
    engine.recalibrate_bn(s.core, train_loader, s.opts, batches,
                          average=lambda t: collective.all_reduce(t, device) / world)


def _epoch_metrics(s: Setup, spec: WorkerSpec, epoch: int, stats: dict, val_loader) -> dict:
    """The reduced metrics of one epoch (every collective on the training device, at every world size)."""
    device = s.opts.device
    sums = collective.all_reduce(torch.tensor([stats["loss"] * stats["images"], stats["images"], stats["img_per_s"]],
                                              dtype=torch.float64), device)
    metrics = {"epoch": epoch + 1, "train/loss": float(sums[0] / max(1.0, float(sums[1]))),
               "train/lr": stats["lr"], "train/img_per_s": float(sums[2])}
    group = ray.util.get_current_placement_group()
    if group is not None:
        metrics[PLACEMENT_GROUP_KEY] = group.id.hex()
    if (epoch + 1) % spec.eval_every == 0 or epoch + 1 == spec.epochs:
        # the unwrapped module: no DDP buffer sync, so a rank without val batches hangs nobody
        cm = engine.evaluate(s.core, val_loader, s.opts, NUM_CLASSES, spec.eval_size, spec.eval_resize)
        cm = collective.all_reduce(cm, device)
        metrics.update({f"val/{k}": v for k, v in scores(cm).items()})
        metrics["val/confusion_matrix"] = cm.tolist()
    return metrics


def _failed(rank: int, text: str) -> dict | None:
    """What a worker returns when a deterministic failure ends the run (FAILURE_KEY)."""
    return {FAILURE_KEY: text} if rank == 0 else None


def train_loop_per_worker(spec: WorkerSpec) -> dict[int, dict[str, float]] | None:
    """Runs in every Ray Train worker (also inside each Ray Tune trial); `spec` is the run's
    WorkerSpec (Ray's train_loop_config). Rank 0 returns the run's epoch history (epoch -> the
    scalar train/ and val/ metrics; Ray's ``Result.return_value``): the driver writes the DVC epoch
    CSV from it, not from the tracking server."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.threads)
    device = ray.train.torch.get_device()
    train_loader, _ = build_loaders(spec, rank, world, 0)
    s = build(spec, device, len(train_loader), sync_bn=device.type == "cuda", wrap=ray.train.torch.prepare_model)
    start_epoch, history = _restore(s, device)
    if collective.any_rank(FAILURE_KEY in history, device):  # every rank read the same checkpoint
        return _failed(rank, history.get(FAILURE_KEY, f"{WORKER_ERROR}a worker could not read the checkpoint"))
    for epoch in range(start_epoch, spec.epochs):
        train_loader, val_loader = build_loaders(spec, rank, world, epoch)
        try:
            stats = engine.train_epoch(s.model, train_loader, s.optimizer, s.scheduler, s.scaler, s.opts, epoch + 1,
                                       any_rank=lambda flag: collective.any_rank(flag, device))
        except engine.NonFiniteLoss as exc:  # every rank stops at this step (the flag is all-reduced)
            return _failed(rank, f"segpipe: {exc}")
        if spec.bn_recalibrate and ((epoch + 1) % spec.eval_every == 0 or epoch + 1 == spec.epochs):
            _recalibrate(s, spec, train_loader, world)
        metrics = _epoch_metrics(s, spec, epoch, stats, val_loader)
        history[epoch + 1] = {k: v for k, v in metrics.items()
                              if k.startswith(("train/", "val/")) and isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_state(Path(tmp) / "state.pt", s, epoch + 1, spec, history)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            # inside a Ray Tune trial, TuneReportCallback forwards this report to Tune
            ray.train.report(metrics, checkpoint=checkpoint)
    return history if rank == 0 else None
