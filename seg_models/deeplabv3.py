"""DeepLabV3 (Chen et al. 2017) on ResNet-50/101 and MobileNetV3-Large.

``aspp="parallel"`` (default) is torchvision's model: the dilated backbone feeds ASPP = 1x1 conv, three
3x3 atrous convs (``atrous_rates``) and image pooling (global pool, 1x1 conv, bilinear back), BN + ReLU in
every branch, concatenated and projected to 256 channels. ResNet's ``output_stride`` is 8 (torchvision's
default; block3 and block4 dilated) or 16 (block4 dilated). The default rates follow the paper: (6, 12, 18)
at output stride 16 and, doubled, (12, 24, 36) at 8. Rates given explicitly are used as given (the
dilations, torchvision's meaning) unless ``atrous_rates_at=16``: then they are rates at output stride 16
(the paper's convention) and scaled by 16 / output_stride, doubled at 8, so one value means one field of
view at both strides ((6, 12, 18) at 16 = (12, 24, 36) at 8 = torchvision's model). ``effective_rates``
gives the dilations a model uses. MobileNetV3 (output stride 16) keeps torchvision's (12, 24, 36).

``aspp="cascade"`` is the paper's other variant (sec. 3.2): three more copies of block4 (block5-7, three
bottlenecks each) are cascaded after block4, each at twice the previous atrous rate instead of a stride,
and every block uses multi-grid unit rates ``rate * multi_grid`` (default (1, 2, 4)); a 3x3 conv-BN-ReLU
and a 1x1 conv give the logits.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from ._utils import SegmentationModel, init_conv
from .backbones import IntermediateLayerGetter, mobilenet_v3_large, resnet
from .fcn import FCNHead

PAPER_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
DEFAULT_MULTI_GRID = (1, 2, 4)


class ASPPConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class ASPPPooling(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        branches = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels), nn.ReLU())]
        branches += [ASPPConv(in_channels, out_channels, rate) for rate in atrous_rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Dropout(0.5),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


def _classifier(in_channels: int, num_classes: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
            nn.Conv2d(256, num_classes, 1)]


class DeepLabHead(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__(ASPP(in_channels, atrous_rates), *_classifier(256, num_classes))


def set_multi_grid(layer: nn.Sequential, rate: int, multi_grid: Sequence[int]) -> nn.Sequential:
    """Give the three bottlenecks of a ResNet block the atrous rates ``rate * multi_grid``."""
    for unit, grid in zip(layer, multi_grid, strict=True):
        unit.conv2.dilation = unit.conv2.padding = (rate * grid, rate * grid)
    return layer


class CascadeHead(nn.Sequential):
    """Block5..block(4+blocks): copies of ResNet's block4 at rates 2x, 4x, 8x block4's, then the classifier."""

    def __init__(self, in_channels: int, num_classes: int, rate: int, multi_grid: Sequence[int],
                 blocks: int = 3) -> None:
        copies = [set_multi_grid(nn.Sequential(*(Bottleneck(in_channels, in_channels // 4) for _ in multi_grid)),
                                 rate * 2 ** (k + 1), multi_grid) for k in range(blocks)]
        super().__init__(*copies, *_classifier(in_channels, num_classes))
        init_conv(self)


def effective_rates(output_stride: int = 16, atrous_rates: Optional[Sequence[int]] = None,
                    atrous_rates_at: Optional[int] = None, aspp: str = "parallel",
                    default: Optional[Sequence[int]] = None) -> Optional[tuple[int, ...]]:
    """The ASPP dilations a model uses: ``atrous_rates`` as given, or scaled from output stride
    ``atrous_rates_at`` to ``output_stride``; ``default`` (else the paper's for the stride) when
    none are given; None for the cascade head (no ASPP)."""
    if aspp == "cascade":
        return None
    if atrous_rates is None:
        return tuple(default or PAPER_RATES[output_stride])
    if atrous_rates_at is None:
        return tuple(atrous_rates)
    scale = atrous_rates_at / output_stride
    return tuple(max(1, round(r * scale)) for r in atrous_rates)


def deeplabv3_resnet(num_classes: int, arch: str, aux_loss: bool = False, output_stride: int = 8,
                     atrous_rates: Optional[Sequence[int]] = None, aspp: str = "parallel",
                     multi_grid: Optional[Sequence[int]] = None, atrous_rates_at: Optional[int] = None,
                     backbone_weights: Optional[str] = None) -> SegmentationModel:
    """torchvision's ``deeplabv3_resnet50/101`` with the defaults; see the module doc for the options."""
    if aspp == "cascade" and atrous_rates is not None:
        raise ValueError("atrous_rates applies to aspp='parallel' only (aspp='cascade' has no ASPP)")
    backbone = resnet(arch, output_stride, backbone_weights)
    rate = 32 // output_stride  # block4's atrous rate
    if aspp == "cascade":
        multi_grid = multi_grid or DEFAULT_MULTI_GRID
    if multi_grid is not None:
        set_multi_grid(backbone.layer4, rate, multi_grid)
    if aspp == "cascade":
        classifier = CascadeHead(2048, num_classes, rate, multi_grid)
    else:
        classifier = DeepLabHead(2048, num_classes, effective_rates(output_stride, atrous_rates, atrous_rates_at))
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
    return SegmentationModel(IntermediateLayerGetter(backbone, return_layers), classifier,
                             FCNHead(1024, num_classes) if aux_loss else None)


def deeplabv3_mobilenet(num_classes: int, aux_loss: bool = False, atrous_rates: Optional[Sequence[int]] = None,
                        atrous_rates_at: Optional[int] = None,
                        backbone_weights: Optional[str] = None) -> SegmentationModel:
    """torchvision's ``deeplabv3_mobilenet_v3_large`` (output stride 16, ASPP on the last block)."""
    features, aux_pos, out_pos = mobilenet_v3_large(backbone_weights)
    return_layers = {str(out_pos): "out", **({str(aux_pos): "aux"} if aux_loss else {})}
    return SegmentationModel(IntermediateLayerGetter(features, return_layers),
                             DeepLabHead(features[out_pos].out_channels, num_classes,
                                         effective_rates(16, atrous_rates, atrous_rates_at, default=(12, 24, 36))),
                             FCNHead(features[aux_pos].out_channels, num_classes) if aux_loss else None)
