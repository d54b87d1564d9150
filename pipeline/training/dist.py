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

import psutil
import ray
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig


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


# ------------------------------------------------------------------------------ process group set-up


def _pin_gloo_interface() -> str | None:
    """Runs in each Ray Train worker before the process group exists: gloo advertises the address
    of the interface named by GLOO_SOCKET_IFNAME, else whatever the hostname resolves to, which on
    many machines (/etc/hosts: `127.0.0.1 <hostname>`) is loopback, so a peer on another node is
    told to connect to 127.0.0.1 and fails ("Gloo connectFullMesh failed ... remote=[127.0.0.1]").
    Pin it to the interface that holds this worker's Ray node address (the address the nodes
    already reach each other by). A GLOO_SOCKET_IFNAME set by the user wins."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    ip = ray.util.get_node_ip_address()
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addrs):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return name
    return None


def torch_config(backend: str):
    """Ray's TorchConfig(backend=...) whose set-up first pins gloo to the Ray node's interface
    (a no-op for NCCL, which picks its interfaces itself; NCCL_SOCKET_IFNAME when it must not).
    Extends whatever backend TorchConfig names (BackendConfig.backend_cls, Backend.on_start: Ray
    Train's backend hooks), without naming Ray's private backend class."""

    class PinnedGlooConfig(TorchConfig):
        @property
        def backend_cls(self):
            base = super().backend_cls

            class PinnedGlooBackend(base):
                def on_start(self, worker_group, backend_config):
                    worker_group.execute(_pin_gloo_interface)
                    super().on_start(worker_group, backend_config)

            return PinnedGlooBackend

    return PinnedGlooConfig(backend=backend)
