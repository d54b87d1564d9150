"""The training set-up, written once: seeds, model, loss options, optimizer param groups, LR
schedule, grad scaler, AMP / channels_last, and the DataLoaders over the shards.

Used by the Ray Train worker (pipeline.training.worker, also inside every Ray Tune trial), by the
plain-loop baseline of `segpipe bench ray` and by benchmarks/gpu_bench.py. Pure PyTorch: no Ray, no
MLflow; importing it pulls neither pyarrow (the shard loaders are imported when
:func:`build_loaders` is called) so gpu_bench stays torch + pyyaml.

Input: the run's :class:`pipeline.training.spec.WorkerSpec` (every knob typed, no defaults here).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.data.voc import NUM_CLASSES
from pipeline.training import engine
from pipeline.training.spec import WorkerSpec
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


def build(spec: WorkerSpec, device: torch.device, steps_per_epoch: int, *, model: torch.nn.Module | None = None,
          sync_bn: bool = False, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Setup:
    """The set-up of one process. `model`: train this module instead of building spec.model (the
    benchmarks' torchvision twins; then nothing is seeded here). `sync_bn`: SyncBatchNorm (the Ray
    workers on GPUs, at world size 1 too: one code path). `wrap`: applied last, e.g.
    ray.train.torch.prepare_model (DDP) or torch.compile; the optimizer holds the core's parameters."""
    if model is None:
        seed_everything(spec.seed)
        model = build_model(spec.model, num_classes=NUM_CLASSES, **spec.options)
    engine.set_bn_momentum(model, spec.bn_momentum)
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    core, wrapped = model, (wrap(model) if wrap is not None else model)
    opts = engine.StepOptions(device=device, amp_dtype=engine.resolve_amp(spec.amp, device),
                              aux_weight=spec.aux_weight, grad_clip=spec.grad_clip, channels_last=spec.channels_last)
    optimizer = engine.make_optimizer(core, spec.lr, spec.momentum, spec.weight_decay, spec.aux_lr_mult)
    steps_per_epoch = max(1, steps_per_epoch)
    scheduler = engine.poly_schedule(optimizer, spec.epochs * steps_per_epoch,
                                     int(spec.warmup_epochs * steps_per_epoch), spec.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=opts.amp_dtype == torch.float16)
    return Setup(model=wrapped, core=core, optimizer=optimizer, scheduler=scheduler, scaler=scaler, opts=opts)


def build_loaders(spec: WorkerSpec, rank: int, world_size: int, epoch: int):
    """(train, val) DataLoaders of this rank's disjoint part of the shards for `epoch`: uint8 images
    and masks (pipeline.training.engine normalises them on the device; `segpipe bench loader`).
    Tune trials: train_split "train-tune", val_split "tune"; a training run: train / val."""
    from torch.utils.data import DataLoader

    # imported here, not at the top: the loaders pull pyarrow, which gpu_bench (torch + pyyaml) must not
    from pipeline.data.loaders import BlockShuffleSampler, ShardDataset, collate_eval
    from pipeline.data.transforms import eval_transform, train_transform

    train_ds = ShardDataset(spec.data_dir, spec.train_split,
                            train_transform(spec.crop_size, spec.scale_min, spec.scale_max, normalize=False,
                                            photometric=spec.photometric, cat_max_ratio=spec.cat_max_ratio),
                            rank=rank, world_size=world_size, pad=True)
    val_ds = ShardDataset(spec.data_dir, spec.val_split, eval_transform(spec.eval_size, normalize=False, full_mask=True,
                                                                        resize=spec.eval_resize),
                          rank=rank, world_size=world_size)
    sampler = BlockShuffleSampler(train_ds, seed=spec.seed * 100 + rank)
    sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch * 101 + rank)
    common = {"num_workers": spec.loader_workers, "pin_memory": torch.cuda.is_available(), "persistent_workers": False}
    train = DataLoader(train_ds, batch_size=spec.batch_size, sampler=sampler, generator=gen,
                       drop_last=True, **common)  # a last batch of 1 breaks BatchNorm; a whole batch is checked before Ray
    val_batch = 1 if spec.eval_resize == "short_side" else spec.batch_size  # short_side: sizes differ
    val = DataLoader(val_ds, batch_size=val_batch, shuffle=False, collate_fn=collate_eval, **common)
    return train, val
