"""FCN (Long et al. 2015): FCN-32s/16s/8s on VGG16, and torchvision's FCN-ResNet.

VGG variants follow the paper: fc6/fc7 become convs, 1x1 score layers on fc7 / pool4 / pool3 (the skip
scores zero-initialised), the coarse score map is upsampled 2x, cropped to the skip's size and added,
and the result is upsampled to the input. Instead of the paper's 100-pixel input padding, the input is
zero-padded at the bottom/right to a multiple of 32 and fc6 uses padding 3: every score map is then
aligned with its pool (which unpooling needs) and the output is cropped back to the input size, so any
input size works.

Two options shape the upsampling path. ``decoder="none"`` (default) is the published FCN-Ns: no
decoder, the score maps are upsampled by ``upsample`` = bilinear or transposed (bilinear-initialised,
learnable) at every step. ``unpool`` cannot work there (a 21-channel score map has no pooling indices
of its own, and an unpooled map is zero at 3 of 4 positions, which nothing would fill in), so it is
refused with ``decoder="none"``.

``decoder="features"`` is one feature decoder (SegNet / DeconvNet style, ``FeatureDecoder``) for all
three methods: fc7 is projected (1x1 conv-BN-ReLU) to pool5's channels, then for each of the five
pools, deepest first, a ``DecoderStage`` upsamples 2x by ``upsample`` (unpool: every channel with its
own indices; bilinear: interpolation; transposed: a learnable bilinear-initialised ConvTranspose2d) to
the pool's input size and a 3x3 conv-BN-ReLU densifies it and maps it to the next shallower pool's
channels (the last one, at full resolution, to 256). FCN-16s / 8s keep the paper's skips in feature
space: a 1x1 conv of pool4 (and pool3) is added after the step that reaches its resolution. A 1x1 conv
predicts the class scores at full resolution, after the densifying convs. To learn within a few SGD
epochs, each densifying conv starts with equal taps (``uniform_taps_``) and the score layer reads the
last stage at a 10x faster effective rate (``SCORE_GAIN``). Convolutions, channels, depth, skips and
initialisation are the same for the three methods; only the upsampling modules differ (transposed
adds its deconvolutions' parameters), so comparing the methods there compares upsampling alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._utils import ScoreConv2d, SegmentationModel, fit, pad_to_multiple
from .backbones import IntermediateLayerGetter, resnet, vgg16
from .upsample import DecoderStage, Upsample, conv_bn_relu

_SKIPS = {32: (), 16: ("pool4",), 8: ("pool4", "pool3")}
DECODERS = ("none", "features")


class FCNHead(nn.Sequential):
    """torchvision's FCN head (also DeepLabV3's aux head)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        inter_channels = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(),
            nn.Dropout(0.1),
            ScoreConv2d(inter_channels, channels, 1),
        )


class FCNVGG(nn.Module):
    """FCN-32s / 16s / 8s (``stride``) on VGG16; ``decoder`` none (the paper's score-map upsampling)
    or features (``FeatureDecoder``), see the module docstring."""

    def __init__(self, num_classes: int, stride: int, upsample: str = "bilinear", decoder: str = "none",
                 backbone_weights: Optional[str] = None, width: float = 1.0, batch_norm: bool = False) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
        if upsample == "unpool" and decoder == "none":
            raise ValueError("upsample 'unpool' needs a feature decoder: set decoder: features (decoder 'none', "
                             "the published FCN, upsamples score maps, which have no pooling indices of their own)")
        self.skips = _SKIPS[stride]
        self.upsample = upsample
        self.backbone = vgg16(backbone_weights, width=width, batch_norm=batch_norm)
        channels = self.backbone.channels
        self.decoder = FeatureDecoder(channels, num_classes, self.skips, upsample) if decoder == "features" else None
        if self.decoder is not None:
            return
        self.score_fr = ScoreConv2d(channels["fc7"], num_classes, 1)
        self.score_pool = nn.ModuleDict({p: ScoreConv2d(channels[p], num_classes, 1) for p in self.skips})
        for conv in self.score_pool.values():
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.upscore_to = nn.ModuleDict({p: Upsample(upsample, num_classes, 2, scores=True) for p in self.skips})
        self.upscore = Upsample(upsample, num_classes, stride, scores=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        features = self.backbone(x)
        if self.decoder is not None:
            return {"out": fit(self.decoder(features), size)}
        pools = features["pools"]
        score, level = self.score_fr(features["fc7"]), 5  # level: how many pools `score` sits below
        for name in self.skips:
            skip = self.score_pool[name](features[name])
            up = self.upscore_to[name](score, skip.shape[-2:], pools[level - 1: level])
            score, level = up + skip, level - 1  # (Upsample crops to the skip's size) + element-wise add
        out = self.upscore(score, x.shape[-2:], pools[:level][::-1])
        return {"out": fit(out, size)}


SCORE_CHANNELS = 256  # width of the feature decoder's last (full-resolution) stage
# initial BN scale of the last stage's features, with the score weights divided by it (same initial
# logits): the score layer then moves the logits SCORE_GAIN**2 = 10x faster (DeepLab trains its
# classifier at 10x lr), as fast as FCN's score layers do, whose coarse scores every upsampled pixel shares
SCORE_GAIN = 10 ** 0.5


class FeatureDecoder(nn.Module):
    """FCN-Ns with ``decoder: features``: the feature decoder of the module docstring; ``method`` is the
    upsampling of every stage (``DecoderStage``), nothing else depends on it."""

    def __init__(self, channels: dict[str, int], num_classes: int, skips: tuple[str, ...],
                 method: str = "unpool") -> None:
        super().__init__()
        c = [channels[f"pool{i}"] for i in range(1, 6)]  # channels of pool1 .. pool5
        self.project = conv_bn_relu(channels["fc7"], c[4], 1)
        # stage for pool L (5..1): upsample c[L-1] channels to pool L's input size, conv to pool L-1's channels
        # the last stage is upsampled no further, so its width is free: a wide one (SCORE_CHANNELS) gives the
        # score layer enough inputs to move the logits as fast as FCN's fc7-fed score layer does
        outs = [c[level - 2] for level in range(5, 1, -1)] + [SCORE_CHANNELS]
        self.stages = nn.ModuleList(DecoderStage(method, c[level - 1], out)
                                    for level, out in zip(range(5, 0, -1), outs))
        self.skip = nn.ModuleDict({p: nn.Conv2d(channels[p], channels[p], 1) for p in skips})
        self.score = ScoreConv2d(SCORE_CHANNELS, num_classes, 1)
        with torch.no_grad():
            self.stages[-1].conv[1].weight.fill_(SCORE_GAIN)
            self.score.weight.div_(SCORE_GAIN)

    def forward(self, features: dict) -> Tensor:
        x = self.project(features["fc7"])
        for level, stage in zip(range(5, 0, -1), self.stages):
            x = stage(x, features["pools"][level - 1])
            name = f"pool{level - 1}"  # x now has pool(L-1)'s resolution and channels
            if name in self.skip:
                x = x + self.skip[name](features[name])
        return self.score(x)


def fcn_resnet(num_classes: int, arch: str, aux_loss: bool = False, output_stride: int = 8,
               backbone_weights: Optional[str] = None) -> SegmentationModel:
    """torchvision's ``fcn_resnet50/101`` (same modules, same state_dict keys)."""
    backbone = resnet(arch, output_stride, backbone_weights)
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
    return SegmentationModel(IntermediateLayerGetter(backbone, return_layers),
                             FCNHead(2048, num_classes), FCNHead(1024, num_classes) if aux_loss else None)
