"""Model helpers shared by the fast model tests (tests/unit/test_models.py) and the ones that
train (tests/integration/test_models_train.py): the registry's names, an odd input size, every
(model, upsample) case, torchvision-equivalence cases, a toy segmentation task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seg_models import build_model, model_info

NAMES = ["fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16", "fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50",
         "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large", "deeplabv3_small", "lraspp_mobilenet_v3_large",
         "unet", "unet_resnet50"]
SMALL = {"unet": {"base_channels": 8}}  # keep the plain UNet cheap; every other model at its defaults
ODD = (45, 61)  # odd, not a multiple of any stride: FCN pads it to 64x64, UNet/ResNet floor at every stride


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def cases():
    for name in NAMES:
        for method in model_info(name)["options"].get("upsample", [None]):
            options = {**SMALL.get(name, {}), **({"upsample": method} if method else {})}
            if method == "unpool" and "decoder" in model_info(name)["options"]:
                options["decoder"] = "features"  # FCN-VGG: a score map has no pooling indices to unpool with
            marks = [pytest.mark.slow] if "resnet101" in name else []
            yield pytest.param(name, options, id=f"{name}-{method or 'default'}", marks=marks)
    yield pytest.param("deeplabv3_resnet50", {"aspp": "cascade", "output_stride": 16}, id="deeplabv3-cascade")
    yield pytest.param("deeplabv3_mobilenet_v3_large", {"aux_loss": True}, id="deeplabv3_mobilenet-aux")
    yield pytest.param("fcn8s_vgg16", {"upsample": "transposed", "decoder": "features", "width": 0.25, "batch_norm": True},
                       id="fcn8s_vgg16-features-transposed")
    yield pytest.param("deeplabv3_small", {"image_pooling": False}, id="deeplabv3_small-no-image-pooling")


TORCHVISION = [
    pytest.param(name, aux, id=f"{name}-aux{aux}", marks=[pytest.mark.slow] if "101" in name else [])
    for name in ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                 "deeplabv3_mobilenet_v3_large"] for aux in (False, True)
] + [pytest.param("lraspp_mobilenet_v3_large", None, id="lraspp_mobilenet_v3_large")]


def toy_scenes(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a bright square (class 1) and a dark disc (class 2) on noise; masks to match."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 0.3 + 0.35
    masks = torch.zeros(n, size, size, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        r, c, s = (int(v) for v in torch.randint(0, size - 12, (3,), generator=g))
        s = 8 + s % 6
        masks[i, r:r + s, c:c + s] = 1
        images[i, :, r:r + s, c:c + s] = torch.tensor([0.95, 0.2, 0.2])[:, None, None]
        cy, cx = (int(v) for v in torch.randint(6, size - 6, (2,), generator=g))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        masks[i][disc] = 2
        images[i][:, disc] = torch.tensor([0.05, 0.05, 0.6])[:, None]
    return (images - 0.5) / 0.25, masks


def train_miou(upsample: str, steps: int = 40, decoder: str | None = None) -> tuple[float, float, float]:
    """FCN-8s (width 1/8) trained on toy scenes with pipeline.engine's optimiser at the quickstart's
    lr: (mean loss of the first 5 steps, of the last 5, held-out mIoU)."""
    torch.manual_seed(0)
    x, y = toy_scenes(24)
    vx, vy = toy_scenes(8, seed=1)
    decoder = decoder or ("features" if upsample == "unpool" else "none")
    model = build_model("fcn8s_vgg16", num_classes=3, upsample=upsample, decoder=decoder, width=0.125, batch_norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    losses = []
    for step in range(steps):
        idx = torch.arange(8) + (step * 8) % 24
        loss = F.cross_entropy(model(x[idx])["out"], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        pred = model.eval()(vx)["out"].argmax(1)
    cm = torch.bincount(vy.flatten() * 3 + pred.flatten(), minlength=9).reshape(3, 3).double()
    iou = cm.diag() / (cm.sum(0) + cm.sum(1) - cm.diag()).clamp(min=1)
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5, float(iou.mean())
