"""Reading the Parquet shards: a torch Dataset, a block-shuffling sampler, the train/eval
transforms (on uint8 (Image, Mask) pairs, torchvision.transforms.v2.functional) and a Ray Data dataset.

Each worker of a distributed run reads a disjoint part of the rows (rank::world_size), decoding
only the row groups that hold its rows. JPEGs are decoded with torchvision.io (no re-encoding),
masks from their PNG bytes, losslessly (palette index = class id).
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors

from torchvision.io import ImageReadMode, decode_jpeg, decode_png

# torchvision 0.29 warns on every decode that its decoders move to torchcodec; they still work.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)
from torchvision.transforms.v2 import functional as TF

from pipeline import storage
from pipeline.training.engine import IMAGENET_MEAN, IMAGENET_STD, normalize_uint8  # noqa: F401  (pure torch; re-exported)
from pipeline.errors import UserError
from pipeline.data.voc import IGNORE_INDEX


def shard_dir(data_dir: str | Path) -> str:
    """<data.dir>/shards: a local path or a URI (s3://..., gs://...), read through pyarrow.fs."""
    return storage.join(data_dir, "shards")


def load_manifest(data_dir: str | Path) -> dict:
    path = storage.join(shard_dir(data_dir), "manifest.json")
    if not storage.exists(path):
        raise UserError(f"no shards in {shard_dir(data_dir)}: run `segpipe preprocess` first (data.dir)")
    try:
        manifest = json.loads(storage.read_text(path))
    except ValueError:
        raise UserError(f"{path} is not valid JSON: re-run `segpipe preprocess` (data.dir)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict) \
            or not isinstance(manifest.get("splits"), dict):
        raise UserError(f"{path} is not a segpipe manifest: re-run `segpipe preprocess` (data.dir)")
    return manifest


def verify_shards(data_dir: str | Path, splits: tuple[str, ...] | None = None) -> dict:
    """Check every shard of manifest.json (of `splits`, default all) before training reads it:
    size, row count (Parquet footer) and sha256 of the whole file. The first mismatch is one
    UserError naming the shard and saying to re-run preprocess. Returns {"shards", "bytes",
    "seconds"} (the cost, for `segpipe bench verify`)."""
    import hashlib
    import time

    started = time.perf_counter()
    manifest = load_manifest(data_dir)
    root = shard_dir(data_dir)
    fix = "re-run `segpipe preprocess` (data.dir)"
    checked, total = 0, 0
    for rel, info in sorted(manifest.get("shards", {}).items()):
        if splits is not None and rel.split("/", 1)[0] not in splits:
            continue
        if ".." in rel.replace("\\", "/").split("/") or rel.startswith("/"):
            raise UserError(f"manifest.json of {root} names a shard outside it ({rel!r}): {fix}")
        path = storage.join(root, rel)
        fs, fpath = storage.filesystem(path)
        fi = fs.get_file_info(fpath)
        if fi.type == storage.pafs.FileType.NotFound:
            raise UserError(f"shard {path} is missing: {fix}")
        if fi.size != info["bytes"]:
            raise UserError(f"shard {path} is {fi.size} bytes, manifest.json says {info['bytes']} "
                            f"(truncated or replaced): {fix}")
        h = hashlib.sha256()
        with fs.open_input_stream(fpath) as f:
            while True:
                block = f.read(1 << 22)
                if not block:
                    break
                h.update(block)
        if h.hexdigest() != info["sha256"]:
            raise UserError(f"shard {path} does not match the sha256 in manifest.json (corrupt): {fix}")
        try:
            rows = storage.open_parquet(path).metadata.num_rows
        except Exception:
            raise UserError(f"shard {path} is not a readable Parquet file: {fix}") from None
        if rows != info["rows"]:
            raise UserError(f"shard {path} has {rows} rows, manifest.json says {info['rows']}: {fix}")
        checked, total = checked + 1, total + fi.size
    return {"shards": checked, "bytes": total, "seconds": time.perf_counter() - started}


def list_shards(data_dir: str | Path, split: str) -> list[str]:
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise UserError(f"split {split!r} not in {shard_dir(data_dir)} (has {sorted(manifest['splits'])})")
    return [storage.join(shard_dir(data_dir), rel) for rel in sorted(manifest["shards"]) if rel.startswith(f"{split}/")]


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 3xHxW (grey JPEGs expanded to RGB)."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_mask(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 HxW of class ids (palette indices as they are)."""
    return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)[0]


class ShardDataset(Dataset):
    """Map-style dataset over one split's shards; this worker's rows are rank::world_size.
    ``split`` "a-b" is split a without the ids of split b (tune trials train on "train-tune").

    With ``pad=True`` (training) every rank gets the same number of items (the first rows are
    repeated, as DistributedSampler does) so DDP ranks run the same number of steps; evaluation
    uses ``pad=False`` so no image is counted twice.
    """

    def __init__(self, data_dir: str | Path, split: str, transform=None, rank: int = 0,
                 world_size: int = 1, pad: bool = False):
        split, _, minus = split.partition("-")  # "train-tune": train without the ids of the tune split
        exclude = {i for f in list_shards(data_dir, minus)
                   for i in storage.open_parquet(f).read(columns=["id"]).column(0).to_pylist()} if minus else set()
        self.files = list_shards(data_dir, split)
        self.transform = transform
        self.index: list[tuple[int, int, int]] = []  # (file, row group, row in group)
        for fi, path in enumerate(self.files):
            pf = storage.open_parquet(path)
            for rg in range(pf.metadata.num_row_groups):
                rows = range(pf.metadata.row_group(rg).num_rows)
                if exclude:
                    ids = pf.read_row_group(rg, columns=["id"]).column(0).to_pylist()
                    rows = [r for r in rows if ids[r] not in exclude]
                self.index.extend((fi, rg, r) for r in rows)
        total = len(self.index)
        if world_size > 1:
            per_rank = math.ceil(total / world_size) if pad else None
            mine = self.index[rank::world_size]
            if pad and total:
                while len(mine) < per_rank:
                    mine.append(self.index[(len(mine) * world_size + rank) % total])
            self.index = mine
        self._cache_key: tuple[int, int] | None = None
        self._cache: dict | None = None
        self._files: dict[int, pq.ParquetFile] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _group(self, fi: int, rg: int) -> dict:
        if self._cache_key != (fi, rg):
            pf = self._files.get(fi)
            if pf is None:
                pf = self._files[fi] = storage.open_parquet(self.files[fi])
            self._cache = pf.read_row_group(rg, columns=["id", "image", "mask"]).to_pydict()
            self._cache_key = (fi, rg)
        return self._cache

    def raw(self, i: int) -> tuple[str, bytes, bytes]:
        fi, rg, r = self.index[i]
        g = self._group(fi, rg)
        return g["id"][r], g["image"][r], g["mask"][r]

    def __getitem__(self, i: int):
        _, img, mask = self.raw(i)
        image = tv_tensors.Image(decode_image(img))
        target = tv_tensors.Mask(decode_mask(mask))
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def __getstate__(self):  # DataLoader workers: open files afresh in each process
        state = self.__dict__.copy()
        state["_files"], state["_cache"], state["_cache_key"] = {}, None, None
        return state

    def block_order(self) -> list[list[int]]:
        """Indices grouped by row group, for BlockShuffleSampler."""
        blocks: dict[tuple[int, int], list[int]] = {}
        for i, (fi, rg, _) in enumerate(self.index):
            blocks.setdefault((fi, rg), []).append(i)
        return list(blocks.values())


class BlockShuffleSampler(Sampler[int]):
    """Shuffles row groups, then rows inside each: random order while each row group is decoded
    from Parquet once per epoch instead of once per image."""

    def __init__(self, dataset: ShardDataset, seed: int = 0):
        self.blocks = dataset.block_order()
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(b) for b in self.blocks)

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        blocks = [list(b) for b in self.blocks]
        rng.shuffle(blocks)
        for b in blocks:
            rng.shuffle(b)
            yield from b


class PadTo(torch.nn.Module):
    """Pad bottom/right to at least `size` (image with 0, mask with 255 = void)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, image, mask):
        h, w = image.shape[-2:]
        ph, pw = max(0, self.size - h), max(0, self.size - w)
        if ph or pw:
            image = TF.pad(image, [0, 0, pw, ph], fill=0)
            mask = TF.pad(mask, [0, 0, pw, ph], fill=IGNORE_INDEX)
        return image, mask


class FitInside(torch.nn.Module):
    """Shrink so the longer side is at most `size` (keeps aspect); smaller images are untouched."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, image, mask):
        h, w = image.shape[-2:]
        if max(h, w) <= self.size:
            return image, mask
        s = self.size / max(h, w)
        size = [max(1, round(h * s)), max(1, round(w * s))]
        return TF.resize(image, size, antialias=True), TF.resize(mask, size)


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

    def __init__(self, size: int, lo: float = 0.5, hi: float = 2.0, normalize: bool = True):
        super().__init__()
        self.size, self.lo, self.hi, self.normalize = size, lo, hi, normalize

    def forward(self, image, mask):
        image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        c = self.size
        h, w = image.shape[-2:]
        u_scale, u_flip, u_top, u_left = torch.rand(4).tolist()  # torch's RNG: seeded per DataLoader worker
        s = self.lo + (self.hi - self.lo) * u_scale
        sh, sw = max(1, round(h * s)), max(1, round(w * s))       # size of the scaled image
        top = min(int(u_top * (max(sh, c) - c + 1)), max(sh, c) - c)  # crop offset in the padded image
        left = min(int(u_left * (max(sw, c) - c + 1)), max(sw, c) - c)
        vh, vw = min(c, sh - top), min(c, sw - left)               # the part of the crop that is image
        flip = u_flip < 0.5
        if flip:  # the crop of the flipped image is the mirror of this window of the unflipped one
            left = sw - left - vw
        fy, fx = h / sh, w / sw
        r0 = min(h - 1, math.floor(top * fy))
        r1 = max(r0 + 1, min(h, math.ceil((top + vh) * fy)))
        c0 = min(w - 1, math.floor(left * fx))
        c1 = max(c0 + 1, min(w, math.ceil((left + vw) * fx)))
        img = TF.resize_image(image[:, r0:r1, c0:c1], [vh, vw], antialias=True)
        m = torch.from_numpy(mask.numpy()[_nearest_rows(vh, r0, r1)][:, _nearest_rows(vw, c0, c1)])
        if flip:
            img, m = img.flip(-1), m.flip(-1)
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
                    normalize: bool = True) -> RandomScaleCrop:
    """Random scale, horizontal flip, pad (mask with 255), random crop, normalise (fused: see
    RandomScaleCrop; normalize=False: uint8 image and mask, normalised later on the device)."""
    return RandomScaleCrop(crop_size, scale_min, scale_max, normalize)


def eval_transform(size: int, normalize: bool = True) -> PairCompose:
    """Shrink to fit inside size x size, then pad to exactly that (mask padded with 255);
    normalize=False: uint8 image and mask, as train_transform."""
    return PairCompose(FitInside(size), PadTo(size), _Finish(normalize))

