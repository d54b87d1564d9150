"""Reading the Parquet shards: the manifest and its check, a torch Dataset and a block-shuffling
sampler. The transforms a dataset applies live in :mod:`pipeline.data.transforms`.

Each worker of a distributed run reads a disjoint part of the rows (rank::world_size), decoding
only the row groups that hold its rows. JPEGs are decoded with torchvision.io (no re-encoding),
masks from their PNG bytes, losslessly (palette index = class id).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

from pipeline import storage
from pipeline.errors import UserError

# torchvision 0.29 warns on every decode that its decoders move to torchcodec; they still work.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)


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
    bad = _bad_entry(manifest)
    if bad:
        raise UserError(f"{path} is damaged: {bad} is not what `segpipe preprocess` writes: re-run it (data.dir)")
    return manifest


# what `segpipe preprocess` writes for each shard and each split (pipeline.data.shards)
_SHARD_ENTRY = {"rows": int, "bytes": int, "sha256": str}
_SPLIT_ENTRY = {"count": int}


def _bad_entry(manifest: dict) -> str | None:
    """The first entry of manifest.json's shards / splits that is not a mapping of the fields its
    readers use, with their types (named shortly, for the error line); None when all are."""
    for section, fields in (("shards", _SHARD_ENTRY), ("splits", _SPLIT_ENTRY)):
        for name, entry in manifest[section].items():
            ok = isinstance(entry, dict) and all(
                isinstance(entry.get(k), t) and not isinstance(entry.get(k), bool) for k, t in fields.items())
            if not ok:
                return f"{section}[{json.dumps(name)[:60]}]"
    return None


def verify_shards(data_dir: str | Path, splits: tuple[str, ...] | None = None) -> dict:
    """Check every shard of manifest.json (of `splits`, default all) before training reads it:
    size, row count (Parquet footer) and sha256 of the whole file. The first mismatch is one
    UserError naming the shard and saying to re-run preprocess. Returns {"shards", "bytes",
    "seconds"} (the cost, for `segpipe bench verify`)."""
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


def collate_eval(batch):
    """An eval batch: the images stacked (all padded to the eval size), the masks as a list at their own
    sizes (eval_transform(full_mask=True): scored at the label's resolution)."""
    return torch.stack([image for image, _ in batch]), [mask for _, mask in batch]


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
