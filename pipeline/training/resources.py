"""What a run needs, checked before it waits or trains: the CPUs and GPUs its workers ask for
against what the Ray cluster has (a placement group that can never be placed waits forever: Ray
Train retries it without limit), and the output folders writable with room for the model file
(found after the last epoch otherwise).

check_fit(p, runs): on a local Ray (this machine only) a run that cannot fit is an `error:` line
naming the knobs; on a cluster, which may grow (autoscaling), a warning on stderr. Before Ray
starts when it is local and not yet up (the machine's CPUs and GPUs are what ray.init takes).
check_outputs(p, model, options): train.models_dir and train.reports_dir made and written to (a probe
file), and the free space of train.models_dir at least the model file's size.
check_batches(p, manifest, tune_families): the split a run (or each family's tune trials) trains on
holds one global batch (training drops the last incomplete one); trial_batch_size: a trial's batch.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import ray
import torch

from pipeline import system
from pipeline.config import Params, family_params
from pipeline.data.voc import NUM_CLASSES
from pipeline.errors import UserError
from seg_models import build_model


def _available(p: Params) -> tuple[float, float] | None:
    """(CPUs, GPUs) of the Ray this run will use; None when it is a cluster not yet joined."""
    if ray.is_initialized():
        have = ray.cluster_resources()
        return have.get("CPU", 0.0), have.get("GPU", 0.0)
    if system.ray_is_local(p.ray.address):
        return float(os.cpu_count() or 1), float(torch.cuda.device_count())
    return None


def check_fit(p: Params, gpu: bool | None = None) -> None:
    """One run's workers (ray.num_workers x {CPU: ray.cpus_per_worker, GPU: 1 with GPUs}) fit the
    cluster. `gpu`: whether the run uses GPUs (default: ray.use_gpu, "auto" = the cluster has one)."""
    have = _available(p)
    if have is None:
        return
    cpus, gpus = have
    if gpu is None:
        gpu = gpus > 0 if p.ray.use_gpu == "auto" else bool(p.ray.use_gpu)
    n = p.ray.num_workers
    short = []
    if n * p.ray.cpus_per_worker > cpus + 1e-9:
        short.append(f"{n * p.ray.cpus_per_worker:g} CPUs (ray.num_workers {n} x ray.cpus_per_worker "
                     f"{p.ray.cpus_per_worker:g}) but Ray has {cpus:g}")
    if gpu and n > gpus:
        short.append(f"{n} GPUs (one per worker, ray.num_workers) but Ray has {gpus:g}")
    if not short:
        return
    msg = f"a training run needs {' and '.join(short)}: lower ray.num_workers or ray.cpus_per_worker"
    if system.ray_is_local(p.ray.address):
        raise UserError(f"{msg} (ray.num_workers)")
    print(f"warning: {msg}; waiting for the cluster to grow", file=sys.stderr, flush=True)


def model_bytes(model: str, options: dict) -> int:
    """The size of the model's float32 weights: what its model file holds (built on the meta device)."""
    with torch.device("meta"):
        net = build_model(model, num_classes=NUM_CLASSES, **options)
    return sum(t.numel() * 4 for t in net.state_dict().values())


def check_outputs(p: Params, model: str, options: dict) -> None:
    need = model_bytes(model, options) + (1 << 20)
    for key, where in (("train.models_dir", p.train.models_dir), ("train.reports_dir", p.train.reports_dir)):
        path = Path(where)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".segpipe-probe-") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise UserError(f"cannot write in {path} ({exc.strerror or exc}): fix its permissions, free some space "
                            f"or choose another {key}; nothing was trained ({key})") from None
        free = shutil.disk_usage(path).free
        if key == "train.models_dir" and free < need:
            raise UserError(f"{path} has {free / 1e6:.1f} MB free but the model file needs {need / 1e6:.1f} MB: "
                            f"free some space or choose another {key}; nothing was trained ({key})")


def check_batches(p: Params, manifest: dict, tune_families: list[str] | None = None) -> None:
    """The split a run trains on holds one global batch (check_batch_fits); tune_families: each
    family's tune trials, which train on train without the tune split, at that family's batch."""
    counts = {s: info.get("count", 0) for s, info in manifest["splits"].items() if isinstance(info, dict)}
    for fam in tune_families or []:
        check_batch_fits(family_params(p, fam), counts, tune=True)
    if tune_families is None:
        check_batch_fits(p, counts)


def trial_batch_size(p: Params) -> int:
    """A tune trial's per-worker batch: the training run's global batch (ray.num_workers x
    train.batch_size) on tune.num_workers workers, so tuned optimiser settings transfer unscaled."""
    return p.train.batch_size * p.ray.num_workers // p.tune.num_workers


def check_batch_fits(p: Params, counts: dict, tune: bool = False) -> None:
    """Training drops the last incomplete batch (a batch of 1 breaks BatchNorm): a split smaller
    than one global batch (train.batch_size x workers) would train on nothing."""
    workers, per_worker, split = p.ray.num_workers, p.train.batch_size, "train split"
    knobs, images = "train.batch_size, ray.num_workers", counts.get("train", 0)
    if tune:  # a trial trains at the run's global batch on tune.num_workers workers
        workers, per_worker = p.tune.num_workers, trial_batch_size(p)
        if counts.get("tune"):
            split, images = "train split without the tune split", images - counts["tune"]
            knobs += ", data.tune_split"
    batch = per_worker * workers
    if images < batch:
        raise UserError(f"the {split} holds {images} images, fewer than one global batch of {batch} "
                        f"({per_worker} per worker x {workers} workers): lower {knobs} or add images")
