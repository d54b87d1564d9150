"""The one object a training process gets: :class:`WorkerSpec`, a frozen, typed subset of the
validated params (``pipeline.config.Params``, the family's train block merged) plus what the driver
resolved (model, options, absolute data dir, splits, threads).

Built once on the driver by :func:`WorkerSpec.from_params`, which reads each ``train.*`` knob of
:data:`TRAIN_KNOBS` by name from the validated params: no knob is copied by hand and none has a
default here (params.yaml is their one home; tests/unit/test_layers.py checks that every field
named here is a TrainParams field of the same type). Trials and benchmarks derive theirs with
``dataclasses.replace``. Pure stdlib, so benchmarks/gpu_bench.py (torch + pyyaml) builds one from
params.yaml's train block too (:func:`WorkerSpec.from_mapping`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping


@dataclass(frozen=True)
class WorkerSpec:
    # what to train, on which data (resolved by the driver)
    model: str
    options: Mapping[str, Any]
    seed: int
    data_dir: str
    train_split: str       # "train", or "train-tune" inside a tune trial
    val_split: str         # "val", or "tune" inside a tune trial
    threads: int           # torch threads per worker (ray.cpus_per_worker, at least 1)
    # the train.* knobs a worker uses: names and types as in pipeline.config.TrainParams
    epochs: int
    batch_size: int
    crop_size: int
    eval_size: int
    eval_resize: Literal["fit", "short_side"]
    photometric: bool
    cat_max_ratio: float
    scale_min: float
    scale_max: float
    lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: float
    poly_power: float
    bn_momentum: float | None
    bn_recalibrate: int
    aux_weight: float
    aux_lr_mult: float
    amp: Literal["auto", "bf16", "fp16", "off"]
    channels_last: bool
    grad_clip: float
    eval_every: int
    loader_workers: int

    @classmethod
    def from_mapping(cls, train: Mapping[str, Any], **resolved: Any) -> "WorkerSpec":
        """`train`: the train block (a TrainParams or a dict of it); `resolved`: the fields the
        driver decides (model, options, seed, data_dir, train_split, val_split, threads). A missing
        field is a TypeError naming it."""
        try:
            knobs = {k: train[k] if isinstance(train, Mapping) else getattr(train, k) for k in TRAIN_KNOBS}
        except (KeyError, AttributeError) as exc:
            raise TypeError(f"the train block has no {exc} for a WorkerSpec") from None
        return cls(**knobs, **resolved)

    @classmethod
    def from_params(cls, p, *, model: str, options: Mapping[str, Any], data_dir: str) -> "WorkerSpec":
        """The spec of a training run of the validated params `p` (its family's train block merged)."""
        return cls.from_mapping(p.train, model=model, options=dict(options), seed=p.seed, data_dir=data_dir,
                                train_split="train", val_split="val", threads=max(1, int(p.ray.cpus_per_worker)))

    def replace(self, **changes: Any) -> "WorkerSpec":
        return dataclasses.replace(self, **changes)


RESOLVED = ("model", "options", "seed", "data_dir", "train_split", "val_split", "threads")
TRAIN_KNOBS = tuple(f.name for f in dataclasses.fields(WorkerSpec) if f.name not in RESOLVED)
