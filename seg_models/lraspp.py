"""LRASPP (Howard et al. 2019, "Searching for MobileNetV3"), torchvision's layout.

The stride-16 output of MobileNetV3-Large (last three bottlenecks dilated by 2) feeds two branches:
1x1 conv-BN-ReLU, and global average pool -> 1x1 conv -> sigmoid (a 1x1 gate, so broadcasting is its
bilinear upsampling), multiplied; bilinear up to the stride-8 feature, 1x1 conv to classes, plus a
1x1 conv of the stride-8 feature; bilinear to the input size.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import ScoreConv2d, SegmentationModel
from .backbones import IntermediateLayerGetter, mobilenet_v3_large


class LRASPPHead(nn.Module):
    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
        )
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = ScoreConv2d(low_channels, num_classes, 1)
        self.high_classifier = ScoreConv2d(inter_channels, num_classes, 1)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        low, high = features["low"], features["high"]
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


def lraspp_mobilenet(num_classes: int, backbone_weights: Optional[str] = None) -> SegmentationModel:
    """torchvision's ``lraspp_mobilenet_v3_large`` (same modules, same state_dict keys)."""
    features, low_pos, high_pos = mobilenet_v3_large(backbone_weights)
    backbone = IntermediateLayerGetter(features, {str(low_pos): "low", str(high_pos): "high"})
    head = LRASPPHead(features[low_pos].out_channels, features[high_pos].out_channels, num_classes)
    return SegmentationModel(backbone, head, in_key=None)
