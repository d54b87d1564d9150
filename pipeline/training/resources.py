"""What a run needs, checked before it waits or trains: the CPUs and GPUs its workers ask for
against what the Ray cluster has (a placement group that can never be placed waits forever: Ray
Train retries it without limit), and the output folders writable with room for the model file
(found after the last epoch otherwise).

check_fit(p, runs): on a local Ray (this machine only) a run that cannot fit is an `error:` line
naming the knobs; on a cluster, which may grow (autoscaling), a warning on stderr. Before Ray
starts when it is local and not yet up (the machine's CPUs and GPUs are what ray.init takes).
check_outputs(p, model, options): train.models_dir and train.reports_dir made and written to (a probe
file), and the free space of train.models_dir at least the model file's size.
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
from pipeline.config import Params
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
