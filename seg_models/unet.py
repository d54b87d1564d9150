"""UNet (Ronneberger et al. 2015) and a UNet decoder on a ResNet-50 encoder.

``unet``: double 3x3 conv (+BN, option ``batch_norm``) at each level, four 2x2 max-pool downs and four
up stages with skip concatenation; convs are padded and every up stage upsamples to its skip's exact
size, so the output has the input size for any input size (the paper used unpadded convs and crops).
An up stage = 1x1 conv to the skip's channel count (the paper's "halve the channels") + ``Upsample``
(bilinear / transposed / unpool with the indices of the matching encoder pool), concatenation with
the skip, double conv. ``base_channels`` (64 in the paper) scales every width.

``unet_resnet50``: torchvision ResNet-50 as the encoder (stride 2, 4, 8, 16, 32 features) so the
recipe can start from ImageNet weights; five up stages (256, 128, 64, 32, 16 channels), the last one
to full resolution without a skip. ResNet downsamples with strided convs, so no ``unpool`` there.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ._utils import ScoreConv2d
from .backbones import IntermediateLayerGetter, resnet
from .upsample import Pool, Upsample, max_pool


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = True) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, bias=not batch_norm))
            layers += [nn.BatchNorm2d(out_channels)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UpStage(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, upsample: str,
                 batch_norm: bool = True) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_channels, out_channels, 1)
        self.up = Upsample(upsample, out_channels, 2)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels, batch_norm)

    def forward(self, x: Tensor, size: Sequence[int], skip: Optional[Tensor] = None,
                pool: Optional[Pool] = None) -> Tensor:
        x = self.up(self.project(x), size, [pool] if pool is not None else [])
        return self.conv(x if skip is None else torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    def __init__(self, num_classes: int, upsample: str = "transposed", base_channels: int = 64,
                 batch_norm: bool = True, in_channels: int = 3) -> None:
        super().__init__()
        ch = [base_channels * 2 ** i for i in range(5)]
        self.inc = DoubleConv(in_channels, ch[0], batch_norm)
        self.down = nn.ModuleList(DoubleConv(ch[i], ch[i + 1], batch_norm) for i in range(4))
        self.up = nn.ModuleList(UpStage(ch[i + 1], ch[i], ch[i], upsample, batch_norm) for i in reversed(range(4)))
        self.head = ScoreConv2d(ch[0], num_classes, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.inc(x)
        skips, pools = [], []
        for down in self.down:
            skips.append(x)
            x, pool = max_pool(x)
            pools.append(pool)
            x = down(x)
        for up in self.up:
            skip = skips.pop()
            x = up(x, skip.shape[-2:], skip, pools.pop())
        return {"out": self.head(x)}


class ResNetUNet(nn.Module):
    _RETURN = {"relu": "0", "layer1": "1", "layer2": "2", "layer3": "3", "layer4": "4"}

    def __init__(self, num_classes: int, arch: str = "resnet50", upsample: str = "transposed",
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
                 backbone_weights: Optional[str] = None) -> None:
        super().__init__()
        self.encoder = IntermediateLayerGetter(resnet(arch, 32, backbone_weights), self._RETURN)
        skip_channels = (1024, 512, 256, 64, 0)
        in_channels = (2048, *decoder_channels[:-1])
        self.decoder = nn.ModuleList(UpStage(i, s, o, upsample)
                                     for i, s, o in zip(in_channels, skip_channels, decoder_channels))
        self.head = ScoreConv2d(decoder_channels[-1], num_classes, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.encoder(x)
        y = features["4"]
        for level, stage in zip((3, 2, 1, 0, None), self.decoder):
            skip = features[str(level)] if level is not None else None
            y = stage(y, size if skip is None else skip.shape[-2:], skip)
        return {"out": self.head(y)}
