"""The training set-up, written once: seeds, model, loss options, optimizer param groups, LR
schedule, grad scaler, AMP / channels_last, and the DataLoaders over the shards.

Used by the Ray Train worker (pipeline.training.worker, also inside every Ray Tune trial), by the
plain-loop baseline of `segpipe bench ray` and by benchmarks/gpu_bench.py. Pure PyTorch: no Ray, no
MLflow; importing it pulls neither pyarrow (the shard loaders are imported when
:func:`build_loaders` is called) so gpu_bench stays torch + pyyaml.

Input: the worker config dict of :func:`pipeline.training.job.worker_config` (model, options, seed,
lr, momentum, weight_decay, aux_lr_mult, aux_weight, grad_clip, bn_momentum, amp, channels_last,
epochs, warmup_epochs, poly_power; build_loaders also data_dir, crop_size, eval_size, scale_min,
scale_max, batch_size, loader_workers and optionally train_split / val_split).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.data.voc import NUM_CLASSES
from pipeline.training import engine
from seg_models import build_model


@dataclass
class Setup:
    """What one training process steps: `model` (wrapped: DDP / torch.compile, or the module itself),
    `core` (the unwrapped module: state dicts, evaluation), optimizer, scheduler, scaler, step options."""

    model: torch.nn.Module
    core: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    opts: engine.StepOptions


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs (same initial weights on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build(cfg: dict, device: torch.device, steps_per_epoch: int, *, model: torch.nn.Module | None = None,
          sync_bn: bool = False, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Setup:
    """The set-up of one process. `model`: train this module instead of building cfg["model"] (the
    benchmarks' torchvision twins; then nothing is seeded here). `sync_bn`: SyncBatchNorm (the Ray
    workers on GPUs, at world size 1 too: one code path). `wrap`: applied last, e.g.
    ray.train.torch.prepare_model (DDP) or torch.compile; the optimizer holds the core's parameters."""
    if model is None:
        seed_everything(cfg["seed"])
        model = build_model(cfg["model"], num_classes=NUM_CLASSES, **cfg["options"])
    engine.set_bn_momentum(model, cfg.get("bn_momentum"))
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    core, wrapped = model, (wrap(model) if wrap is not None else model)
    opts = engine.StepOptions(device=device, amp_dtype=engine.resolve_amp(cfg["amp"], device),
                              aux_weight=cfg["aux_weight"], grad_clip=cfg.get("grad_clip", 0.0),
                              channels_last=cfg["channels_last"])
    optimizer = engine.make_optimizer(core, cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg.get("aux_lr_mult", 1.0))
    steps_per_epoch = max(1, steps_per_epoch)
    scheduler = engine.poly_schedule(optimizer, cfg["epochs"] * steps_per_epoch,
                                     int(cfg.get("warmup_epochs", 0) * steps_per_epoch), cfg.get("poly_power", 0.9))
    scaler = torch.amp.GradScaler(device.type, enabled=opts.amp_dtype == torch.float16)
    return Setup(model=wrapped, core=core, optimizer=optimizer, scheduler=scheduler, scaler=scaler, opts=opts)


def build_loaders(cfg: dict, rank: int, world_size: int, epoch: int):
    """(train, val) DataLoaders of this rank's disjoint part of the shards for `epoch`: uint8 images
    and masks (pipeline.training.engine normalises them on the device; `segpipe bench loader`).
    Tune trials: train_split "train-tune", val_split "tune"; a training run: train / val."""
    from torch.utils.data import DataLoader

    # imported here, not at the top: the loaders pull pyarrow, which gpu_bench (torch + pyyaml) must not
    from pipeline.data.loaders import BlockShuffleSampler, ShardDataset
    from pipeline.data.transforms import eval_transform, train_transform

    train_ds = ShardDataset(cfg["data_dir"], cfg.get("train_split", "train"),
                            train_transform(cfg["crop_size"], cfg["scale_min"], cfg["scale_max"], normalize=False),
                            rank=rank, world_size=world_size, pad=True)
    val_ds = ShardDataset(cfg["data_dir"], cfg.get("val_split", "val"), eval_transform(cfg["eval_size"], normalize=False),
                          rank=rank, world_size=world_size)
    sampler = BlockShuffleSampler(train_ds, seed=cfg["seed"] * 100 + rank)
    sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch * 101 + rank)
    common = {"num_workers": cfg["loader_workers"], "pin_memory": torch.cuda.is_available(), "persistent_workers": False}
    train = DataLoader(train_ds, batch_size=cfg["batch_size"], sampler=sampler, generator=gen,
                       drop_last=len(train_ds) >= cfg["batch_size"], **common)
    val = DataLoader(val_ds, batch_size=cfg["batch_size"], shuffle=False, **common)
    return train, val
