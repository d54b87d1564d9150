"""DeepLabV3 (Chen et al. 2017) on ResNet-50/101, MobileNetV3-Large and a small CNN.

``aspp="parallel"`` (default) is torchvision's model: the dilated backbone feeds ASPP = 1x1 conv, three
3x3 atrous convs (``atrous_rates``) and image pooling (global pool, 1x1 conv, bilinear back), BN + ReLU in
every branch, concatenated and projected to 256 channels. ResNet's ``output_stride`` is 8 (torchvision's
default; block3 and block4 dilated) or 16 (block4 dilated). The default rates follow the paper: (6, 12, 18)
at output stride 16 and, doubled, (12, 24, 36) at 8. Rates given explicitly are used as given (the
dilations, torchvision's meaning) unless ``atrous_rates_at=16``: then they are rates at output stride 16
(the paper's convention) and scaled by 16 / output_stride, doubled at 8, so one value means one field of
view at both strides ((6, 12, 18) at 16 = (12, 24, 36) at 8 = torchvision's model). ``effective_rates``
gives the dilations a model uses. MobileNetV3 (output stride 16) keeps torchvision's (12, 24, 36).
``image_pooling=False`` drops the image-pooling branch (the paper's ablation, its Table 5): the
projection then reads four branches. A 3x3 atrous conv whose rate is at least the side of the feature
map it sees only has its centre tap inside the map: it is a 1x1 conv (the paper's remark; see
``seg_models.geometry``).

``aspp="cascade"`` is the paper's other variant (sec. 3.2): three more copies of block4 (block5-7, three
bottlenecks each) are cascaded after block4, each at twice the previous atrous rate instead of a stride,
and every block uses multi-grid unit rates ``rate * multi_grid`` (default (1, 2, 4)); a 3x3 conv-BN-ReLU
and a 1x1 conv give the logits. It has no ASPP, so ``atrous_rates`` and ``image_pooling=False`` are
refused with it.

``deeplabv3_small`` is for CPU experiments at 64-96 px crops: ``SmallBackbone`` (five 3x3 conv-BN-ReLU
layers, ``width``/2x/4x channels, three stride-2 stages: output stride 8, a receptive field of 39 px,
no pretrained weights) and the same head (parallel ASPP with image pooling unless disabled, 3x3
conv-BN-ReLU, 1x1 classifier) at ``2 * width`` channels, no aux head. At width 32: 0.58 M parameters,
1.7 GFLOPs for a forward pass of batch 8 at 96 x 96.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from ._utils import ScoreConv2d, SegmentationModel, init_conv
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
    """1x1 conv, one 3x3 atrous conv per rate, image pooling unless ``image_pooling`` is False (then
    ``convs`` ends with the atrous convs), concatenated and projected to ``out_channels``."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256,
                 image_pooling: bool = True) -> None:
        super().__init__()
        branches = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels), nn.ReLU())]
        branches += [ASPPConv(in_channels, out_channels, rate) for rate in atrous_rates]
        if image_pooling:
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


def _classifier(in_channels: int, num_classes: int, channels: int = 256) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            ScoreConv2d(channels, num_classes, 1)]


class DeepLabHead(nn.Sequential):
    """ASPP, then 3x3 conv-BN-ReLU and a 1x1 classifier; ``channels`` wide (torchvision: 256)."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36),
                 image_pooling: bool = True, channels: int = 256) -> None:
        super().__init__(ASPP(in_channels, atrous_rates, channels, image_pooling),
                         *_classifier(channels, num_classes, channels))


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
                     image_pooling: bool = True, backbone_weights: Optional[str] = None) -> SegmentationModel:
    """torchvision's ``deeplabv3_resnet50/101`` with the defaults; see the module doc for the options."""
    if aspp == "cascade" and atrous_rates is not None:
        raise ValueError("atrous_rates applies to aspp='parallel' only (aspp='cascade' has no ASPP)")
    if aspp == "cascade" and not image_pooling:
        raise ValueError("image_pooling applies to aspp='parallel' only (aspp='cascade' has no ASPP)")
    backbone = resnet(arch, output_stride, backbone_weights)
    rate = 32 // output_stride  # block4's atrous rate
    if aspp == "cascade":
        multi_grid = multi_grid or DEFAULT_MULTI_GRID
    if multi_grid is not None:
        set_multi_grid(backbone.layer4, rate, multi_grid)
    if aspp == "cascade":
        classifier = CascadeHead(2048, num_classes, rate, multi_grid)
    else:
        classifier = DeepLabHead(2048, num_classes, effective_rates(output_stride, atrous_rates, atrous_rates_at),
                                 image_pooling)
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
    return SegmentationModel(IntermediateLayerGetter(backbone, return_layers), classifier,
                             FCNHead(1024, num_classes) if aux_loss else None)


def deeplabv3_mobilenet(num_classes: int, aux_loss: bool = False, atrous_rates: Optional[Sequence[int]] = None,
                        atrous_rates_at: Optional[int] = None, image_pooling: bool = True,
                        backbone_weights: Optional[str] = None) -> SegmentationModel:
    """torchvision's ``deeplabv3_mobilenet_v3_large`` (output stride 16, ASPP on the last block)."""
    features, aux_pos, out_pos = mobilenet_v3_large(backbone_weights)
    return_layers = {str(out_pos): "out", **({str(aux_pos): "aux"} if aux_loss else {})}
    rates = effective_rates(16, atrous_rates, atrous_rates_at, default=(12, 24, 36))
    return SegmentationModel(IntermediateLayerGetter(features, return_layers),
                             DeepLabHead(features[out_pos].out_channels, num_classes, rates, image_pooling),
                             FCNHead(features[aux_pos].out_channels, num_classes) if aux_loss else None)


class SmallBackbone(nn.Sequential):
    """``deeplabv3_small``'s CNN: 3x3 conv-BN-ReLU layers, ``width`` -> 2 ``width`` -> 4 ``width`` channels
    over three stride-2 stages (a stride-2 conv each, then one stride-1 conv in the last two): output
    stride 8, receptive field 39 px. ``forward`` returns ``{"out": features}`` like a torchvision
    ``IntermediateLayerGetter``."""

    def __init__(self, width: int = 32, in_channels: int = 3) -> None:
        plan = [(in_channels, width, 2), (width, 2 * width, 2), (2 * width, 2 * width, 1),
                (2 * width, 4 * width, 2), (4 * width, 4 * width, 1)]
        super().__init__(*(nn.Sequential(nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o),
                                         nn.ReLU(inplace=True)) for i, o, s in plan))
        self.out_channels = 4 * width

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": super().forward(x)}


def deeplabv3_small(num_classes: int, width: int = 32, output_stride: int = 8,
                    atrous_rates: Optional[Sequence[int]] = None, atrous_rates_at: Optional[int] = None,
                    image_pooling: bool = True) -> SegmentationModel:
    """A DeepLabV3 for CPU experiments: ``SmallBackbone`` (output stride 8, receptive field 39 px, no
    pretrained weights) and the DeepLabV3 head (ASPP, 3x3 conv-BN-ReLU, 1x1 classifier) at
    ``2 * width`` channels; rates as for ResNet at output stride 8."""
    if output_stride != 8:
        raise ValueError(f"output_stride must be 8 for deeplabv3_small, got {output_stride!r}")
    backbone = SmallBackbone(width)
    head = DeepLabHead(backbone.out_channels, num_classes, effective_rates(8, atrous_rates, atrous_rates_at),
                       image_pooling, channels=2 * width)
    init_conv(backbone)  # ResNet's init for the backbone; the head keeps PyTorch's, as torchvision's does
    return SegmentationModel(backbone, head)
