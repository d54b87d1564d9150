"""The training step, written once: pure PyTorch (no Ray, no MLflow), used by `segpipe train`
(inside Ray Train workers), by every Ray Tune trial and by the GPU benchmark.

SGD with momentum, poly LR (power 0.9) after an optional linear warmup, weight decay,
cross-entropy with ignore_index 255 plus aux loss × aux_weight where the model has an aux head,
AMP (bf16 / fp16 with a grad scaler on GPU), channels_last, optional gradient clipping, and a
guard that stops on a NaN / inf loss.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.transforms import eval_scale, normalize_uint8, scaled_size
from pipeline.data.voc import IGNORE_INDEX
from pipeline.training.metrics import confusion_matrix


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"loss became NaN at epoch {epoch} step {step}")
        self.epoch, self.step = epoch, step


@dataclass
class StepOptions:
    device: torch.device
    amp_dtype: torch.dtype | None = None   # None: full precision
    aux_weight: float = 0.5
    grad_clip: float = 0.0                 # 0: off
    channels_last: bool = True


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto' -> bf16 on a GPU that has it, else fp16 on GPU, off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def set_bn_momentum(model: torch.nn.Module, momentum: float | None) -> None:
    """MobileNetV3's BN momentum is 0.01 (ImageNet-length schedules): its running statistics lag
    far behind on short runs. A larger momentum makes eval-mode BN usable after few steps."""
    if momentum is None:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float,
                   aux_lr_mult: float = 1.0) -> torch.optim.SGD:
    """SGD; the aux classifier (where the model has one) at ``aux_lr_mult`` x lr (torchvision's recipe: 10)."""
    aux = getattr(getattr(model, "module", model), "aux_classifier", None)  # (DDP wraps the model in .module)
    aux_ids = {id(p) for p in aux.parameters()} if aux is not None and aux_lr_mult != 1.0 else set()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in aux_ids]}]
    if aux_ids:
        groups.append({"params": [p for p in aux.parameters() if p.requires_grad], "lr": lr * aux_lr_mult})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_schedule(optimizer, total_iters: int, warmup_iters: int = 0, power: float = 0.9):
    """Linear warmup from lr/10 over warmup_iters, then (1 - t/T)^power."""
    total_iters = max(1, total_iters)

    def factor(it: int) -> float:
        if it < warmup_iters:
            return 0.1 + 0.9 * it / max(1, warmup_iters)
        t = min(it, total_iters - 1) - warmup_iters
        return (1 - t / max(1, total_iters - warmup_iters)) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_fn(outputs: dict, target: torch.Tensor, aux_weight: float) -> torch.Tensor:
    loss = F.cross_entropy(outputs["out"].float(), target, ignore_index=IGNORE_INDEX)
    if "aux" in outputs and outputs["aux"] is not None:
        loss = loss + aux_weight * F.cross_entropy(outputs["aux"].float(), target, ignore_index=IGNORE_INDEX)
    return loss


def _autocast(opts: StepOptions):
    if opts.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=opts.device.type, dtype=opts.amp_dtype)


def _to_device(images, targets, opts: StepOptions):
    images = images.to(opts.device, non_blocking=True)
    if images.dtype == torch.uint8:  # the loaders' uint8 batches (pipeline.data.loaders, normalize=False)
        images = normalize_uint8(images)
    if opts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(opts.device, non_blocking=True).long()


def train_epoch(model, loader, optimizer, scheduler, scaler, opts: StepOptions, epoch: int,
                any_rank=None) -> dict[str, float]:
    """One pass over `loader`. Returns mean loss, images/s, last lr and the image count.

    any_rank: `flag -> bool`, true on every rank when the flag is true on one (pipeline.dist.any_rank
    in the Ray workers). The non-finite-loss check goes through it before backward, so a NaN on
    one rank stops every rank at the same step (instead of the others waiting in DDP's gradient
    all-reduce until the collective times out). None: this process alone decides."""
    model.train()
    total_loss, n_images, n_steps = 0.0, 0, 0
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        images, targets = _to_device(images, targets, opts)
        with _autocast(opts):
            outputs = model(images)
        loss = loss_fn(outputs, targets, opts.aux_weight)
        bad = not bool(torch.isfinite(loss.detach()))
        if any_rank(bad) if any_rank is not None else bad:
            raise NonFiniteLoss(epoch, step)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            if opts.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if opts.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            optimizer.step()
        scheduler.step()
        total_loss += float(loss.detach()) * images.shape[0]
        n_images += images.shape[0]
        n_steps += 1
    if opts.device.type == "cuda":
        torch.cuda.synchronize(opts.device)
    elapsed = time.perf_counter() - start
    return {
        "loss": total_loss / max(1, n_images),
        "img_per_s": n_images / elapsed if elapsed > 0 else 0.0,
        "lr": optimizer.param_groups[0]["lr"],
        "images": n_images,
        "steps": n_steps,
    }


@torch.no_grad()
def recalibrate_bn(model, loader, opts: StepOptions, batches: int, average=None) -> int:
    """Re-estimate every BatchNorm's running mean / var as the plain average over `batches` train
    batches (momentum None: a cumulative average), in train mode with no gradient; `average` (a
    tensor -> its mean over the ranks) makes every rank hold the same statistics. The caller gives
    every rank the same `batches` (SyncBatchNorm all-gathers in each forward). Returns the batches used."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or batches <= 0:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    used = 0
    for images, targets in loader:
        if used >= batches:
            break
        images, _ = _to_device(images, targets, opts)
        with _autocast(opts):
            model(images)
        used += 1
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
        if average is not None:
            m.running_mean.copy_(average(m.running_mean))
            m.running_var.copy_(average(m.running_var))
    return used


@torch.no_grad()
def to_label_size(logits: torch.Tensor, label_size, eval_size: int, resize: str = "fit") -> torch.Tensor:
    """Logits (N x C x h' x w', maybe padded) of an image the eval transform resized (``resize`` at
    ``eval_size``: pipeline.data.transforms.eval_scale) -> the logits at the label's own
    ``label_size`` (H, W): the unpadded part, resized back bilinearly in fp32 (none when not resized)."""
    h, w = label_size
    sh, sw = scaled_size(h, w, eval_scale(h, w, eval_size, resize))  # as the eval transform computed it
    part = logits[..., :sh, :sw].float()
    if (sh, sw) == (h, w):
        return part
    return F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False)


def evaluate(model, loader, opts: StepOptions, num_classes: int, eval_size: int | None = None,
             resize: str = "fit") -> torch.Tensor:
    """Confusion matrix (int64, on CPU) of `model` over `loader`; the caller all-reduces it
    (pipeline.dist.all_reduce moves it to the training device). Pass the unwrapped module
    (model.module under DDP): eval needs no DDP buffer broadcast, and a rank whose loader is empty
    (a val split smaller than the world size) then runs no collective the others wait for.
    Scored at each label's full resolution whatever the eval size: the loader gives a list of
    masks at their own size (pipeline.data.loaders.collate_eval), each image's logits are resized
    back to it before the argmax (to_label_size; eval_size None: the batch's side). The logits are
    fp32 (seg_models' ScoreConv2d): under bf16/fp16 near-ties would round to ties the argmax breaks
    by class index."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for images, masks in loader:
        images, _ = _to_device(images, torch.empty(0), opts)
        with _autocast(opts):
            logits = model(images)["out"]
        for i, mask in enumerate(masks):
            mask = mask.to(opts.device, non_blocking=True).long()
            size = eval_size or images.shape[-1]
            pred = to_label_size(logits[i:i + 1], mask.shape[-2:], size, resize).argmax(1)[0]
            cm += confusion_matrix(pred, mask, num_classes)
    return cm
