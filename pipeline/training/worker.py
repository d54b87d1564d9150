"""`train_loop_per_worker`: what every Ray Train worker runs (in `segpipe train` and inside each
Ray Tune trial).

Each worker reads a disjoint part of the shards (pipeline.training.setup.build_loaders), steps
pipeline.training.engine, all-reduces the epoch sums and the confusion matrix through
pipeline.training.dist before any metric is computed, and reports one dict per epoch to Ray
(rank 0 attaches a checkpoint: pipeline.training.checkpoint's state.pt). A NaN / inf loss on any
rank stops every rank at the same step; the driver turns the worker's error text into one
`error:` line (WORKER_ERROR, "loss became NaN at epoch E step S").
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from pipeline.data.voc import NUM_CLASSES
from pipeline.errors import UserError
from pipeline.training import dist as collective
from pipeline.training import engine
from pipeline.training.checkpoint import load_state, restore_state, save_state
from pipeline.training.metrics import scores
from pipeline.training.setup import Setup, build, build_loaders

# A worker's error the driver turns into one `error:` line (Ray wraps worker exceptions).
WORKER_ERROR = "segpipe-user-error: "


def _restore(s: Setup, device: torch.device) -> int:
    """Resume from Ray's latest checkpoint (a restarted worker group, train.resume): epochs done."""
    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0
    with ckpt.as_directory() as d:
        try:
            state = load_state(Path(d) / "state.pt", map_location=device)
        except UserError as exc:  # the driver checked it before Ray started; a swap since then lands here
            raise RuntimeError(f"{WORKER_ERROR}{exc}") from None
    return restore_state(s, state)


def _epoch_metrics(s: Setup, cfg: dict, epoch: int, stats: dict, val_loader) -> dict:
    """The reduced metrics of one epoch (every collective on the training device, at every world size)."""
    device = s.opts.device
    sums = collective.all_reduce(torch.tensor([stats["loss"] * stats["images"], stats["images"], stats["img_per_s"]],
                                              dtype=torch.float64), device)
    metrics = {"epoch": epoch + 1, "train/loss": float(sums[0] / max(1.0, float(sums[1]))),
               "train/lr": stats["lr"], "train/img_per_s": float(sums[2])}
    if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
        # the unwrapped module: no DDP buffer sync, so a rank without val batches hangs nobody
        cm = collective.all_reduce(engine.evaluate(s.core, val_loader, s.opts, NUM_CLASSES), device)
        metrics.update({f"val/{k}": v for k, v in scores(cm).items()})
        metrics["val/confusion_matrix"] = cm.tolist()
    return metrics


def train_loop_per_worker(cfg: dict) -> None:
    """Runs in every Ray Train worker (also inside each Ray Tune trial)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg["threads"])
    device = ray.train.torch.get_device()
    train_loader, _ = build_loaders(cfg, rank, world, 0)
    s = build(cfg, device, len(train_loader), sync_bn=device.type == "cuda", wrap=ray.train.torch.prepare_model)
    start_epoch = _restore(s, device)
    for epoch in range(start_epoch, cfg["epochs"]):
        train_loader, val_loader = build_loaders(cfg, rank, world, epoch)
        try:
            stats = engine.train_epoch(s.model, train_loader, s.optimizer, s.scheduler, s.scaler, s.opts, epoch + 1,
                                       any_rank=lambda flag: collective.any_rank(flag, device))
        except engine.NonFiniteLoss as exc:  # every rank stops at this step (the flag is all-reduced)
            raise RuntimeError(f"segpipe: {exc}") from None
        metrics = _epoch_metrics(s, cfg, epoch, stats, val_loader)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_state(Path(tmp) / "state.pt", s, epoch + 1, cfg)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            # inside a Ray Tune trial, TuneReportCallback forwards this report to Tune
            ray.train.report(metrics, checkpoint=checkpoint)
