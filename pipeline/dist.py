"""Every collective of the training workers, in one place (issue 13).

Contract: a tensor handed to a collective is first moved to the *training device* (the model's
device: cuda:N under NCCL, cpu under gloo), reduced there, and handed back on the device it came
from with its dtype. Nothing else in pipeline/ calls torch.distributed collectives.

Why move the tensor rather than use a mixed process group (`cpu:gloo,cuda:nccl`, which Ray's
TorchConfig does accept): with the helper, a CPU tensor (the epoch sums, the confusion matrix
engine.evaluate returns on CPU) travels the same NCCL path as the gradients, so a 1-GPU run
exercises exactly the calls of an 8-GPU run, and there is one backend to set up, debug and time
out. The cost is one host<->device copy of a few hundred bytes per epoch (a 21x21 int64 matrix).

No `if world > 1` anywhere: Ray Train initialises a process group at every world size (also 1),
and `ensure_process_group` makes a 1-process gloo group where nothing did (a script or a test
calling the worker code outside Ray), so a single worker goes through the same calls.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist


def ensure_process_group() -> None:
    """A world-size-1 gloo group when no process group exists yet (Ray Train made one already)."""
    if dist.is_initialized():
        return
    fd, path = tempfile.mkstemp(prefix="segpipe-pg-")
    os.close(fd)
    os.unlink(path)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)


def all_reduce(tensor: torch.Tensor, device: torch.device, op: str = "sum") -> torch.Tensor:
    """all_reduce `tensor` across the workers on `device` (the training device); returns a new
    tensor on the caller's device and dtype. op: sum | max | min."""
    ensure_process_group()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    work = tensor.detach().to(device=device, copy=True)
    dist.all_reduce(work, op=ops[op])
    return work.to(tensor.device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (one all_reduce of one int)."""
    return bool(all_reduce(torch.tensor([int(flag)], dtype=torch.int32), device, "max").item())
