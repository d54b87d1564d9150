"""Backbones: torchvision's VGG16, ResNet-50/101 and MobileNetV3-Large, reused, not rewritten.

Each builder constructs the torchvision classification model with ``weights=None``, optionally loads
an ImageNet state dict from a local file (``backbone_weights``, torchvision's format, strict), and
hands the model to the family, which picks its features with torchvision's ``IntermediateLayerGetter``.
Nothing is downloaded here: ``BACKBONE_WEIGHTS`` tells a separate fetch step what to download.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models._utils import IntermediateLayerGetter

from ._utils import file_path
from .upsample import max_pool

__all__ = ["BACKBONE_WEIGHTS", "IntermediateLayerGetter", "load_backbone_weights", "mobilenet_v3_large",
           "resnet", "vgg16", "VGG16Backbone"]

_URL = "https://download.pytorch.org/models/"
#: backbone -> (torchvision url, file name) of the ImageNet weights torchvision's segmentation models start from
BACKBONE_WEIGHTS: dict[str, tuple[str, str]] = {
    arch: (_URL + fname, fname)
    for arch, fname in {
        "vgg16": "vgg16-397923af.pth",
        "resnet50": "resnet50-0676ba61.pth",
        "resnet101": "resnet101-63fe2227.pth",
        "mobilenet_v3_large": "mobilenet_v3_large-8738ca79.pth",
    }.items()
}

# torchvision file names embed the first hex digits of the file's sha256 (torch.hub's check_hash)
_TORCHVISION_FILE = re.compile(r"(vgg16|resnet50|resnet101|mobilenet_v3_large)-([0-9a-f]{6,64})\.pth")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_backbone_weights(model: nn.Module, path: Optional[str], arch: str) -> nn.Module:
    """Load a torchvision ``arch`` state dict from the local file ``path`` into ``model`` (strict).

    A torchvision file name (``resnet50-0676ba61.pth``) must match the architecture and the sha256
    prefix it embeds. Every problem is a ValueError naming ``backbone_weights``.
    """
    if path is None:
        return model
    path = file_path("backbone_weights", path)
    name = os.path.basename(path)
    match = _TORCHVISION_FILE.fullmatch(name)
    if match:
        if match.group(1) != arch:
            raise ValueError(f"backbone_weights: {name} holds {match.group(1)} weights, this model's backbone is {arch}")
        digest = _sha256(path)
        if not digest.startswith(match.group(2)):
            raise ValueError(f"backbone_weights: sha256 of {path} is {digest[:12]}..., its name says "
                             f"{match.group(2)}: corrupt or not the torchvision file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # unpickling errors, missing/unexpected keys, shape mismatches
        reason = str(e).strip().splitlines()[0][:300]
        raise ValueError(f"backbone_weights: {path} is not a torchvision {arch} state dict ({reason})") from e
    return model


# --------------------------------------------------------------------------- ResNet
_DILATION = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}


def resnet(arch: str, output_stride: int = 32, weights: Optional[str] = None) -> tvm.ResNet:
    """torchvision ResNet; output stride 8/16 replaces the last strides by dilation (DeepLab)."""
    model = getattr(tvm, arch)(weights=None, replace_stride_with_dilation=_DILATION[output_stride])
    return load_backbone_weights(model, weights, arch)


# --------------------------------------------------------------------------- MobileNetV3
def mobilenet_v3_large(weights: Optional[str] = None) -> tuple[nn.Sequential, int, int]:
    """torchvision MobileNetV3-Large ``features`` with the last three bottlenecks dilated (stride 16),
    plus the positions of its stride-8 (C2) and last (C5, stride 16) blocks, as torchvision picks them."""
    model = load_backbone_weights(tvm.mobilenet_v3_large(weights=None, dilated=True), weights, "mobilenet_v3_large")
    features = model.features
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    return features, stages[-4], stages[-1]


# --------------------------------------------------------------------------- VGG16
def _linear_as_conv(linear: nn.Linear, in_channels: int, kernel_size: int, padding: int = 0) -> nn.Conv2d:
    """A conv sharing ``linear``'s parameters, reshaped (fully connected -> convolution, FCN sec. 3.1)."""
    conv = nn.Conv2d(in_channels, linear.out_features, kernel_size, padding=padding, device="meta")
    conv.weight = nn.Parameter(linear.weight.detach().reshape(conv.weight.shape))
    conv.bias = nn.Parameter(linear.bias.detach())
    return conv


class VGG16Backbone(nn.Module):
    """torchvision ``vgg16().features`` run layer by layer, each max-pool also returning its indices,
    and fc6/fc7 as 7x7 (padding 3) / 1x1 convs holding the ImageNet fc weights.

    ``forward`` returns ``pool1`` ... ``pool5``, ``fc7`` and ``pools`` (the ``Pool`` records of the five
    max-pools, for unpooling).
    """

    def __init__(self, vgg: tvm.VGG) -> None:
        super().__init__()
        self.features = vgg.features
        fc6, fc7 = vgg.classifier[0], vgg.classifier[3]
        self.channels: dict[str, int] = {}  # pool1..pool5, fc7 -> channels
        last = 3
        for layer in vgg.features:
            if isinstance(layer, nn.Conv2d):
                last = layer.out_channels
            elif isinstance(layer, nn.MaxPool2d):
                self.channels[f"pool{len(self.channels) + 1}"] = last
        self.channels["fc7"] = fc7.out_features
        self.fc = nn.Sequential(_linear_as_conv(fc6, self.channels["pool5"], 7, padding=3), nn.ReLU(inplace=True),
                                nn.Dropout(0.5), _linear_as_conv(fc7, fc6.out_features, 1), nn.ReLU(inplace=True),
                                nn.Dropout(0.5))

    def forward(self, x: Tensor) -> dict:
        out: dict = {"pools": []}
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                x, pool = max_pool(x)
                out["pools"].append(pool)
                out[f"pool{len(out['pools'])}"] = x
            else:
                x = layer(x)
        out["fc7"] = self.fc(x)
        return out


def vgg16(weights: Optional[str] = None, width: float = 1.0, batch_norm: bool = False) -> VGG16Backbone:
    """torchvision's VGG16 (``vgg16_bn`` layout with batch_norm). ``width`` < 1 scales every conv
    and fc layer's channels (for CPU runs; ImageNet weights then cannot apply)."""
    if width == 1.0 and not batch_norm:
        return VGG16Backbone(load_backbone_weights(tvm.vgg16(weights=None), weights, "vgg16"))
    if weights is not None:
        raise ValueError("backbone_weights needs the paper's VGG16: width 1 and batch_norm False")
    from torchvision.models.vgg import cfgs, make_layers

    cfg = [v if v == "M" else max(8, round(v * width)) for v in cfgs["D"]]
    fc = max(16, round(4096 * width))
    vgg = tvm.VGG(make_layers(cfg, batch_norm=batch_norm), init_weights=True)
    vgg.classifier = nn.Sequential(nn.Linear(cfg[-2] * 49, fc), nn.ReLU(True), nn.Dropout(),
                                   nn.Linear(fc, fc), nn.ReLU(True), nn.Dropout(), nn.Linear(fc, 1000))
    return VGG16Backbone(vgg)
