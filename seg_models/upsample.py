"""The three upsampling methods of the seed notes, in one place.

``Upsample(method, channels, scale)`` keeps the channel count and enlarges by ``scale``:

- ``bilinear``: ``F.interpolate(mode="bilinear", align_corners=False)`` (no parameters).
- ``transposed``: ``ConvTranspose2d(kernel=2*scale, stride=scale, padding=scale//2)`` initialised to
  the bilinear kernel of FCN (``1 - |i - (scale - 0.5)| / scale`` per axis, one filter per channel) and
  learnable. With that padding the output is aligned with the input grid: it equals
  ``F.interpolate(scale_factor=scale, align_corners=False)`` exactly, except on the outer ``scale // 2``
  rows/columns, where interpolate clamps to the border and the convolution sees zeros.
- ``unpool``: ``F.max_unpool2d`` with the indices of the pool(s) being undone, zeros elsewhere; a
  ``scale`` of ``2**k`` undoes ``k`` pools. Every channel is unpooled with its own indices (SegNet /
  DeconvNet), so the map being unpooled has the pooled features' channel count. Unpooling alone leaves
  3 of every 4 positions zero: a model puts learnable convolutions after it (``DecoderStage``) and
  predicts class scores only after them (see fcn.py and unet.py).

``DecoderStage(method, channels, out_channels)`` is one step of a feature decoder with any of the
three: the same 3x3 conv-BN-ReLU after each, so comparing methods there compares upsampling alone.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import fit, no_autocast

METHODS = ("bilinear", "transposed", "unpool")


class Pool(NamedTuple):
    """What unpooling needs from a max-pool: its indices and the size of its input."""

    indices: Tensor
    size: tuple[int, int]


def max_pool(x: Tensor) -> tuple[Tensor, Pool]:
    """2x2/2 max pool (VGG's and UNet's) that also returns its ``Pool`` record."""
    size = tuple(x.shape[-2:])
    x, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    return x, Pool(indices, size)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DecoderStage(nn.Module):
    """One step of a feature decoder (SegNet / DeconvNet style): ``Upsample(method, channels, 2)`` to
    the size of the input of the pool being undone, then a learnable 3x3 conv-BN-ReLU (taps started
    equal, ``uniform_taps_``) to ``out_channels``. Only the upsampling differs between methods:
    ``unpool`` puts every channel at its own max's position (the map has the pooled features'
    channel count; 3 of 4 positions stay zero, which the conv densifies), ``bilinear`` interpolates,
    ``transposed`` is a learnable bilinear-initialised ``ConvTranspose2d``."""

    def __init__(self, method: str, channels: int, out_channels: int) -> None:
        super().__init__()
        self.channels = channels
        with torch.random.fork_rng(devices=[]):  # a deconv's discarded default init draws no numbers, so
            self.up = Upsample(method, channels, 2)  # the three methods' convs start from the same weights
        self.conv = conv_bn_relu(channels, out_channels)
        uniform_taps_(self.conv[0])

    def forward(self, x: Tensor, pool: Pool) -> Tensor:
        """Undo ``pool``: to its input size (``pool.size``), with its indices when unpooling."""
        return self.conv(self.up(x, pool.size, [pool]))


def uniform_taps_(conv: nn.Conv2d) -> nn.Conv2d:
    """Give every spatial tap of ``conv`` the same (out, in) weight (its default-initialised centre tap).

    This is the densifying conv's init after an unpool, the counterpart of the bilinear init of
    ``transposed``: an unpooled value then reaches the output the same way wherever in its 2x2 window
    its max was, so at init a stage is a 1x1 conv of the coarse map spread over the window (a smoothed
    nearest upsampling) and the taps learn from there how to use the positions the indices give. With
    independent random taps, each channel of each 2x2 block lands on a tap picked by its own index: the
    full-resolution features are position noise that the score layer cannot learn from in a short run
    (quickstart FCN-8s: background only after 3 epochs, even at 10x the decoder's learning rate).
    ``DecoderStage`` uses it after every method (bilinear and transposed too), so the stages of the
    three methods start alike and differ in the upsampling only."""
    with torch.no_grad():
        k = conv.weight.shape[-2:]
        conv.weight.copy_(conv.weight[:, :, k[0] // 2: k[0] // 2 + 1, k[1] // 2: k[1] // 2 + 1].expand_as(conv.weight))
    return conv


def bilinear_kernel(channels: int, scale: int) -> Tensor:
    """Weight (channels, channels, 2*scale, 2*scale) of a per-channel bilinear upsampling by ``scale``."""
    k = 2 * scale
    center = scale - 0.5
    og = 1 - (torch.arange(k, dtype=torch.float32) - center).abs() / scale
    weight = torch.zeros(channels, channels, k, k)
    weight[range(channels), range(channels)] = og[:, None] * og[None, :]
    return weight


class Upsample(nn.Module):
    def __init__(self, method: str, channels: int, scale: int, scores: bool = False) -> None:
        """``scores``: ``x`` holds class scores, upsampled in fp32 outside autocast (as ScoreConv2d)."""
        super().__init__()
        self.scores = scores
        if method not in METHODS:
            raise ValueError(f"upsample must be one of {', '.join(METHODS)}, got {method!r}")
        if scale < 2 or scale & (scale - 1):
            raise ValueError(f"upsampling scale must be a power of two >= 2, got {scale}")
        self.method, self.scale = method, scale
        if method == "transposed":
            self.deconv = nn.ConvTranspose2d(channels, channels, 2 * scale, stride=scale,
                                             padding=scale // 2, bias=False)
            with torch.no_grad():
                self.deconv.weight.copy_(bilinear_kernel(channels, scale))

    def forward(self, x: Tensor, size: Sequence[int], pools: Sequence[Pool] = ()) -> Tensor:
        """Upsample to exactly ``size``; ``pools`` (for ``unpool``) are the pools to undo, deepest first."""
        if self.scores:
            with no_autocast(x):
                return self._upsample(x.float(), size, pools)
        return self._upsample(x, size, pools)

    def _upsample(self, x: Tensor, size: Sequence[int], pools: Sequence[Pool]) -> Tensor:
        if self.method == "bilinear":
            return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        if self.method == "transposed":
            return fit(self.deconv(x), size)
        if 2 ** len(pools) != self.scale:
            raise ValueError(f"unpool by {self.scale} needs {self.scale.bit_length() - 1} pools, got {len(pools)}")
        for pool in pools:
            if pool.indices.shape[1] != x.shape[1]:
                raise ValueError(f"unpool: {x.shape[1]} channels to unpool, the pool's indices have "
                                 f"{pool.indices.shape[1]} (each channel is unpooled with its own indices)")
            x = F.max_unpool2d(x, pool.indices, 2, output_size=pool.size)
        return fit(x, size)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, scale={self.scale}"
