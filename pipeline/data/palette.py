"""The PASCAL VOC colour map and the one way masks are written to disk.

VOC masks are one-channel palette ("P") PNGs: each pixel holds the class index (0..20, 255 = void)
and the palette only decides how it looks in an image viewer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.data.voc import IGNORE_INDEX

__all__ = ["VOC_PALETTE", "voc_palette", "save_mask_png", "colorize", "overlay"]


def voc_palette(n: int = 256) -> list[int]:
    """The standard VOC colour map (the devkit's ``labelcolormap.m``, bitget algorithm) as a flat
    ``[r0, g0, b0, r1, g1, b1, ...]`` list of ``3 * n`` ints."""
    palette: list[int] = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend((r, g, b))
    return palette


VOC_PALETTE: list[int] = voc_palette(256)


def save_mask_png(array, path) -> Path:
    """Write a H×W uint8 class-index array as a palette PNG with the VOC colours.

    The file is written to a temporary name next to ``path`` and renamed, so ``path`` is either
    absent or complete. Returns ``path``.
    """
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H×W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"mask values must be in 0..255, got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    path = Path(path)
    img = Image.fromarray(np.ascontiguousarray(arr))  # mode "L"
    img.putpalette(VOC_PALETTE)  # "L" + palette -> mode "P", pixel values unchanged
    with storage.atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def colorize(mask: np.ndarray) -> np.ndarray:
    """HxW class ids (255 = void) -> HxWx3 uint8 in the VOC palette (void drawn in its cream)."""
    pal = np.asarray(VOC_PALETTE, dtype=np.uint8).reshape(-1, 3)
    return pal[mask.astype(np.int64).clip(0, 255)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """HxWx3 uint8 image with the non-background, non-void classes of `mask` blended in."""
    out = image.astype(np.float32).copy()
    sel = (mask != 0) & (mask != IGNORE_INDEX)
    out[sel] = (1 - alpha) * out[sel] + alpha * colorize(mask)[sel].astype(np.float32)
    return out.round().clip(0, 255).astype(np.uint8)
