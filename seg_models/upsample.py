"""The three upsampling methods of the seed notes, in one place.

``Upsample(method, channels, scale)`` keeps the channel count and enlarges by ``scale``:

- ``bilinear``: ``F.interpolate(mode="bilinear", align_corners=False)`` (no parameters).
- ``transposed``: ``ConvTranspose2d(kernel=2*scale, stride=scale, padding=scale//2)`` initialised to
  the bilinear kernel of FCN (``1 - |i - (scale - 0.5)| / scale`` per axis, one filter per channel) and
  learnable. With that padding the output is aligned with the input grid: it equals
  ``F.interpolate(scale_factor=scale, align_corners=False)`` exactly, except on the outer ``scale // 2``
  rows/columns, where interpolate clamps to the border and the convolution sees zeros.
- ``unpool``: ``F.max_unpool2d`` with the indices of the pool(s) being undone, zeros elsewhere; a
  ``scale`` of ``2**k`` undoes ``k`` pools. Indices with one channel (see ``spatial_indices``) are
  shared by every channel, so score maps with fewer channels than the pooled features can be unpooled.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import fit

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


def spatial_indices(pooled: Tensor, pool: Pool) -> Pool:
    """One index per pooled position: the one chosen by the channel with the largest pooled value."""
    return Pool(pool.indices.gather(1, pooled.argmax(1, keepdim=True)), pool.size)


def bilinear_kernel(channels: int, scale: int) -> Tensor:
    """Weight (channels, channels, 2*scale, 2*scale) of a per-channel bilinear upsampling by ``scale``."""
    k = 2 * scale
    center = scale - 0.5
    og = 1 - (torch.arange(k, dtype=torch.float32) - center).abs() / scale
    weight = torch.zeros(channels, channels, k, k)
    weight[range(channels), range(channels)] = og[:, None] * og[None, :]
    return weight


class Upsample(nn.Module):
    def __init__(self, method: str, channels: int, scale: int) -> None:
        super().__init__()
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
        if self.method == "bilinear":
            return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        if self.method == "transposed":
            return fit(self.deconv(x), size)
        if 2 ** len(pools) != self.scale:
            raise ValueError(f"unpool by {self.scale} needs {self.scale.bit_length() - 1} pools, got {len(pools)}")
        for pool in pools:
            indices = pool.indices.expand(-1, x.shape[1], -1, -1) if pool.indices.shape[1] == 1 else pool.indices
            x = F.max_unpool2d(x, indices, 2, output_size=pool.size)
        return fit(x, size)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, scale={self.scale}"
