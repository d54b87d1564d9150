"""The train / eval transforms of segpipe: (Image, Mask) uint8 pairs in, model inputs out.

Pure torch / torchvision.transforms.v2.functional (no Ray, no MLflow). Contract:
- :func:`train_transform` (crop_size, scale_min, scale_max): random scale, horizontal flip, pad
  (image 0, mask 255 = void) and random crop to crop_size x crop_size, fused in
  :class:`RandomScaleCrop`;
- :func:`eval_transform` (size): shrink to fit inside size x size (:class:`FitInside`), pad to
  exactly that (:class:`PadTo`);
- ``normalize=True``: float32 image normalised with ImageNet's mean / std and an int64 mask;
  ``normalize=False``: both stay uint8 and :func:`normalize_uint8`
  normalises the batch on the device (what `segpipe train`'s loaders do).

A new transform is a ``torch.nn.Module`` whose ``forward(image, mask)`` returns the pair;
compose them with :class:`PairCompose`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from pipeline.data.voc import IGNORE_INDEX

__all__ = ["train_transform", "eval_transform", "RandomScaleCrop", "FitInside", "PadTo", "PairCompose",
           "IMAGENET_MEAN", "IMAGENET_STD", "normalize_uint8"]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N x] 3 x H x W -> float32 (x / 255 - mean) / std with ImageNet's mean and std, on the
    tensor's device, in two passes (v2.ToDtype + Normalize take three). The loaders of `segpipe
    train` hand over uint8 batches (4x fewer bytes from the DataLoader workers and to the GPU) and
    the step normalises them here."""
    images = images.as_subclass(torch.Tensor)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1) * 255)
    return (images.float() - mean).mul_(inv_std)


class PadTo(torch.nn.Module):
    """Pad bottom/right to at least `size` (image with 0, mask with 255 = void; pad_mask=False: the
    mask as it is)."""

    def __init__(self, size: int, pad_mask: bool = True):
        super().__init__()
        self.size, self.pad_mask = size, pad_mask

    def forward(self, image, mask):
        h, w = image.shape[-2:]
        ph, pw = max(0, self.size - h), max(0, self.size - w)
        if ph or pw:
            image = TF.pad(image, [0, 0, pw, ph], fill=0)
            if self.pad_mask:
                mask = TF.pad(mask, [0, 0, pw, ph], fill=IGNORE_INDEX)
        return image, mask


SHORT_SIDE_MAX_RATIO = 4  # short_side: the long side at most this x eval size (mmsegmentation: 2048 for 512)


def eval_scale(h: int, w: int, size: int, resize: str = "fit") -> float:
    """The factor the eval transform resizes an h x w image by. fit: shrink to fit inside size x size,
    never upscale; short_side: the short side to `size` (up or down), the long side at most
    SHORT_SIDE_MAX_RATIO x size (mmsegmentation's and torchvision's test resize)."""
    if resize == "short_side":
        return min(size / min(h, w), SHORT_SIDE_MAX_RATIO * size / max(h, w))
    return min(1.0, size / max(h, w))


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, round(h * scale)), max(1, round(w * scale))


class ShortSide(torch.nn.Module):
    """Resize so the short side is `size` (up or down; eval_scale "short_side"); the mask as it is
    (evaluation scores at the label's own resolution)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, image, mask):
        h, w = image.shape[-2:]
        size = scaled_size(h, w, eval_scale(h, w, self.size, "short_side"))
        return (image if size == (h, w) else TF.resize(image, list(size), antialias=True)), mask


class FitInside(torch.nn.Module):
    """Shrink so the longer side is at most `size` (keeps aspect); smaller images are untouched.
    resize_mask=False: the mask keeps its full resolution (evaluation scores there)."""

    def __init__(self, size: int, resize_mask: bool = True):
        super().__init__()
        self.size, self.resize_mask = size, resize_mask

    def forward(self, image, mask):
        h, w = image.shape[-2:]
        if max(h, w) <= self.size:
            return image, mask
        size = list(scaled_size(h, w, eval_scale(h, w, self.size)))
        return TF.resize(image, size, antialias=True), (TF.resize(mask, size) if self.resize_mask else mask)


_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_INV_STD_255 = 1.0 / (torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255)


class _Finish(torch.nn.Module):
    """uint8 image -> normalised float; mask -> int64 HxW. With normalize=False both stay uint8."""

    def __init__(self, normalize: bool = True):
        super().__init__()
        self.normalize = normalize

    def forward(self, image, mask):
        image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        if not self.normalize:
            return image, mask
        return normalize_uint8(image), mask.long()


def _nearest_rows(n_out: int, start: int, stop: int) -> np.ndarray:
    """Source indices of nearest-exact resampling of [start, stop) to n_out samples (pixel centres
    aligned, as the bilinear image resize is)."""
    idx = ((np.arange(n_out) + 0.5) * ((stop - start) / n_out)).astype(np.int64)
    return np.minimum(idx, stop - start - 1) + start


CROP_TRIES = 10  # mmsegmentation's RandomCrop tries 10 crops for cat_max_ratio


def _mixed(mask: torch.Tensor, cat_max_ratio: float) -> bool:
    """More than one class in the crop's labelled pixels, none of them over cat_max_ratio of them."""
    counts = torch.bincount(mask[mask != IGNORE_INDEX].long().flatten())
    counts = counts[counts > 0]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


def photometric_distortion(img: torch.Tensor) -> torch.Tensor:
    """mmsegmentation's PhotoMetricDistortion on a uint8 3 x H x W crop, each step with p = 0.5:
    brightness + U(-32, 32), contrast x U(0.5, 1.5) (before or after the colour steps, at random),
    saturation x U(0.5, 1.5), hue + U(-18, 18) of OpenCV's 180 (torchvision's saturation blends
    with the grey image where mmsegmentation scales HSV's S: the same range, not the same pixels)."""
    u = torch.rand(9).tolist()
    x = img.float()
    if u[0] < 0.5:
        x = x + (u[1] * 64 - 32)
    contrast_first = u[2] < 0.5
    if contrast_first and u[3] < 0.5:
        x = x * (0.5 + u[4])
    x = x.clamp_(0, 255)
    if u[5] < 0.5:
        x = TF.adjust_saturation(x / 255, 0.5 + u[6]) * 255
    if u[7] < 0.5:
        x = TF.adjust_hue(x / 255, (u[8] * 36 - 18) / 180) * 255
    if not contrast_first and u[3] < 0.5:
        x = x * (0.5 + u[4])
    return x.clamp_(0, 255).round_().to(torch.uint8)


class RandomScaleCrop(torch.nn.Module):
    """Random scale in [lo, hi], horizontal flip (p=0.5), pad bottom/right (image 0, mask 255) and
    random crop to size x size -- the composition RandomScale -> flip -> PadTo -> RandomCrop,
    computed on the part of the image that lands in the crop only: that source window is cut
    first and resized (uint8, antialiased) straight to its place, the mask by an index gather, and
    the result is normalised once into the padded canvas. Same distribution of scales, flips and
    offsets as the composition, at a fraction of its cost (`segpipe bench loader`).

    normalize=False returns a uint8 image and a uint8 mask (4x and 8x fewer bytes to pass from
    DataLoader workers and to copy to the GPU): pipeline.training.engine normalises such batches on the
    device and makes the masks int64 there."""

    def __init__(self, size: int, lo: float = 0.5, hi: float = 2.0, normalize: bool = True,
                 photometric: bool = False, cat_max_ratio: float = 1.0):
        super().__init__()
        self.size, self.lo, self.hi, self.normalize = size, lo, hi, normalize
        self.photometric, self.cat_max_ratio = photometric, cat_max_ratio

    def _window(self, h: int, w: int, sh: int, sw: int, u_top: float, u_left: float, flip: bool):
        """The crop at these offsets: its image part (vh, vw) and the source window r0:r1, c0:c1."""
        c = self.size
        top = min(int(u_top * (max(sh, c) - c + 1)), max(sh, c) - c)  # crop offset in the padded image
        left = min(int(u_left * (max(sw, c) - c + 1)), max(sw, c) - c)
        vh, vw = min(c, sh - top), min(c, sw - left)               # the part of the crop that is image
        if flip:  # the crop of the flipped image is the mirror of this window of the unflipped one
            left = sw - left - vw
        fy, fx = h / sh, w / sw
        r0 = min(h - 1, math.floor(top * fy))
        r1 = max(r0 + 1, min(h, math.ceil((top + vh) * fy)))
        c0 = min(w - 1, math.floor(left * fx))
        c1 = max(c0 + 1, min(w, math.ceil((left + vw) * fx)))
        return vh, vw, r0, r1, c0, c1

    def forward(self, image, mask):
        image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        c = self.size
        h, w = image.shape[-2:]
        u_scale, u_flip, u_top, u_left = torch.rand(4).tolist()  # torch's RNG: seeded per DataLoader worker
        s = self.lo + (self.hi - self.lo) * u_scale
        sh, sw = max(1, round(h * s)), max(1, round(w * s))       # size of the scaled image
        flip = u_flip < 0.5
        tries = CROP_TRIES if self.cat_max_ratio < 1 else 1
        for attempt in range(tries):  # mmsegmentation's RandomCrop(cat_max_ratio): redraw a crop one class fills
            if attempt:
                u_top, u_left = torch.rand(2).tolist()
            vh, vw, r0, r1, c0, c1 = self._window(h, w, sh, sw, u_top, u_left, flip)
            m = torch.from_numpy(mask.numpy()[_nearest_rows(vh, r0, r1)][:, _nearest_rows(vw, c0, c1)])
            if attempt == tries - 1 or _mixed(m, self.cat_max_ratio):
                break
        img = TF.resize_image(image[:, r0:r1, c0:c1], [vh, vw], antialias=True)
        if flip:
            img, m = img.flip(-1), m.flip(-1)
        if self.photometric:
            img = photometric_distortion(img)
        if not self.normalize:
            if vh == c and vw == c:
                return img.contiguous(), m.contiguous()
            out = torch.zeros(3, c, c, dtype=torch.uint8)
            target = torch.full((c, c), IGNORE_INDEX, dtype=torch.uint8)
            out[:, :vh, :vw], target[:vh, :vw] = img, m
            return out, target
        if vh == c and vw == c:
            return normalize_uint8(img), m.long()
        out = (-_MEAN_255 * _INV_STD_255).expand(3, c, c).clone()  # padding: a 0 pixel, normalised
        out[:, :vh, :vw] = normalize_uint8(img)
        target = torch.full((c, c), IGNORE_INDEX, dtype=torch.int64)
        target[:vh, :vw] = m
        return out, target


class PairCompose(torch.nn.Module):
    def __init__(self, *steps):
        super().__init__()
        self.steps = torch.nn.ModuleList(steps)

    def forward(self, image, mask):
        for step in self.steps:
            image, mask = step(image, mask)
        return image, mask


def train_transform(crop_size: int, scale_min: float = 0.5, scale_max: float = 2.0,
                    normalize: bool = True, photometric: bool = False, cat_max_ratio: float = 1.0) -> RandomScaleCrop:
    """Random scale, horizontal flip, pad (mask with 255), random crop, normalise (fused: see
    RandomScaleCrop; normalize=False: uint8 image and mask, normalised later on the device);
    photometric: mmsegmentation's PhotoMetricDistortion on the crop; cat_max_ratio < 1: a crop one
    class fills beyond that share is redrawn (up to CROP_TRIES times)."""
    return RandomScaleCrop(crop_size, scale_min, scale_max, normalize, photometric, cat_max_ratio)


def eval_transform(size: int, normalize: bool = True, full_mask: bool = False, resize: str = "fit") -> PairCompose:
    """Shrink to fit inside size x size, then pad to exactly that (mask padded with 255);
    normalize=False: uint8 image and mask, as train_transform. full_mask=True: the mask stays at its
    own size, unpadded (evaluation scores at the label's resolution: engine.to_label_size).
    resize="short_side": the short side to `size` instead (ShortSide, full_mask only: images of
    different aspects then differ in size, so such a val loader holds one image per batch)."""
    if resize == "short_side":
        if not full_mask:
            raise ValueError("eval resize short_side scores at the label's resolution: full_mask=True")
        return PairCompose(ShortSide(size), _Finish(normalize))
    return PairCompose(FitInside(size, resize_mask=not full_mask), PadTo(size, pad_mask=not full_mask),
                       _Finish(normalize))
