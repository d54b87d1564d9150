"""Raw VOC -> Parquet shards + manifest.json: the logic of `segpipe preprocess`.

Shard schema (:data:`SCHEMA`, one row per image): id (str), split (str), image (the original JPEG
bytes), mask (a one-channel PNG of class ids 0..20 and 255 = void; the VOC palette PNG bytes as
they are when already one-channel), height, width (int32). <data.dir>/shards/<split>/part-NNNNN.parquet,
row groups of <= data.row_group_rows rows, a new part once data.shard_max_mb of image+mask bytes
is reached. shards/manifest.json: version, source, splits.<split>.{count, class_pixels},
shards.<split/part>.{rows, bytes, sha256}, train_list, train_from. With data.tune_split a `tune`
split (rows copied from train) is written too.

Contract of :func:`preprocess`: every image/mask pair is validated in worker processes
(:func:`load_pair`; all cores by default) and streamed into shards under <data.dir>/.shards-new/
(each part under a .tmp name, renamed when closed), swapped in by :func:`pipeline.storage.swap_in`
at the end, under the data.dir writer lock. A run that finds a bad pair raises one UserError
listing every bad id and leaves the previous shards untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pipeline import storage
from pipeline.config import Params
from pipeline.data.checks import check_id_lists
from pipeline.data.download import sha256sum
from pipeline.data.voc import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES, RawLayout, read_id_list
from pipeline.errors import UserError
from pipeline.storage import check_owned, clean_debris, os_error, writer_lock

# a shards/ written before the ownership mark (pipeline.storage.OWNER_MARK) existed has its manifest
SHARDS_LEGACY = ("manifest.json",)

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
MANIFEST_VERSION = 1


def _encode_mask(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _png_bit_depth(data: bytes) -> int:
    """The bit depth in a PNG's IHDR (byte 24); 0 when the header is not there."""
    return data[24] if len(data) > 25 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" else 0


def load_pair(job: tuple[str, str, str, str]) -> dict:
    """Read and validate one pair. Returns a row (plus a class histogram) or {"id", "error"}."""
    split, sid, img_path, mask_path = job
    try:
        img_bytes = Path(img_path).read_bytes()
    except OSError:
        return {"id": sid, "split": split, "error": "image file missing or unreadable"}
    if not os.path.isfile(mask_path):
        return {"id": sid, "split": split, "error": "listed without a mask"}
    try:
        with Image.open(io.BytesIO(img_bytes)) as im:
            fmt, size = im.format, im.size
            if fmt == "JPEG":
                # validation only: decode at 1/8 scale (libjpeg's DCT scaling). Every scan is still
                # entropy-decoded, so a truncated file raises as before, at about half the CPU.
                im.draft(im.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()  # a truncated file raises here
    except Exception as exc:  # PIL raises many types for broken files
        return {"id": sid, "split": split, "error": f"undecodable or truncated image ({exc.__class__.__name__})"}
    if fmt != "JPEG":
        return {"id": sid, "split": split, "error": f"image is {fmt}, expected JPEG"}
    try:
        mask_bytes = Path(mask_path).read_bytes()
        with Image.open(io.BytesIO(mask_bytes)) as m:
            mfmt, mmode = m.format, m.mode
            arr = np.asarray(m)
    except Exception as exc:
        return {"id": sid, "split": split, "error": f"undecodable mask ({exc.__class__.__name__})"}
    if mmode not in ("P", "L") or arr.ndim != 2:
        return {"id": sid, "split": split, "error": f"mask is a {mmode} image, expected one channel of class ids (palette or grey PNG)"}
    if (arr.shape[1], arr.shape[0]) != size:
        return {"id": sid, "split": split,
                "error": f"image is {size[0]}x{size[1]} but mask is {arr.shape[1]}x{arr.shape[0]}"}
    hist = np.bincount(arr.ravel(), minlength=256)
    bad = [v for v in np.nonzero(hist)[0].tolist() if v >= NUM_CLASSES and v != IGNORE_INDEX]
    if bad:
        return {"id": sid, "split": split, "error": f"mask values outside 0..20 and 255: {bad[:8]}"}
    if mfmt != "PNG" or _png_bit_depth(mask_bytes) != 8:
        # training decodes the stored bytes with torchvision (decode_png, UNCHANGED), which reads a
        # 1/2/4-bit palette PNG's samples scaled to 8 bits (15 -> 255): store what PIL read, as 8-bit
        mask_bytes = _encode_mask(arr.astype(np.uint8))
    counts = hist[:NUM_CLASSES].tolist() + [int(hist[IGNORE_INDEX])]
    return {"id": sid, "split": split, "image": img_bytes, "mask": mask_bytes,
            "height": size[1], "width": size[0], "hist": counts}


class ShardWriter:
    """Writes rows into part-NNNNN.parquet files of one split, row group by row group."""

    def __init__(self, out_dir: Path, row_group_rows: int, max_bytes: float):
        self.out_dir = out_dir
        self.row_group_rows = row_group_rows
        self.max_bytes = max_bytes
        self.buffer: list[dict] = []
        self.writer: pq.ParquetWriter | None = None
        self.part = 0
        self.part_bytes = 0
        self.part_rows = 0
        self.closed: list[tuple[Path, int]] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def _tmp(self) -> Path:
        return self.out_dir / f"part-{self.part:05d}.parquet.tmp"

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self._tmp(), SCHEMA, compression="NONE", write_statistics=["id"])
        cols = {name: [r[name] for r in self.buffer] for name in SCHEMA.names}
        self.writer.write_table(pa.table(cols, schema=SCHEMA), row_group_size=self.row_group_rows)
        self.part_rows += len(self.buffer)
        self.part_bytes += sum(len(r["image"]) + len(r["mask"]) for r in self.buffer)
        self.buffer = []
        if self.part_bytes >= self.max_bytes:
            self._close_part()

    def _close_part(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        final = self.out_dir / f"part-{self.part:05d}.parquet"
        self._tmp().rename(final)
        self.closed.append((final, self.part_rows))
        self.writer, self.part, self.part_bytes, self.part_rows = None, self.part + 1, 0, 0

    def close(self) -> list[tuple[Path, int]]:
        self._flush()
        self._close_part()
        return self.closed


def tune_split_ids(train_ids: list[str], spec: float | list[str]) -> set[str]:
    """The ids of the tuning split: an id list as given (each must be a train id), or the fraction of
    train ids with the smallest sha256 (at least one): deterministic, independent of order and seed."""
    if isinstance(spec, list):
        missing = sorted(set(spec) - set(train_ids))
        if missing:
            raise UserError(f"{len(missing)} id(s) of data.tune_split are not train ids: {', '.join(missing[:5])} "
                            "(data.tune_split)")
        return set(spec)
    if not spec or not train_ids:
        return set()
    n = max(1, round(spec * len(train_ids)))
    return set(sorted(train_ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:n])


def preprocess(p: Params, progress: bool = True) -> dict:
    """Under the data.dir writer lock (pipeline.storage): one writer at a time, debris of an
    interrupted run removed first; an OSError while writing is one `error:` line."""
    data_dir = Path(p.data.dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"{data_dir} is a file, not a directory: choose another path (data.dir)")
    if not data_dir.is_dir():
        RawLayout.load(data_dir / "raw")  # nothing fetched: say so before creating anything
    with writer_lock(data_dir):
        check_owned(data_dir / "shards", "data.dir", SHARDS_LEGACY)
        try:
            clean_debris(data_dir)
            return _preprocess(p, progress)
        except OSError as exc:
            raise os_error(exc, data_dir, "write the shards") from None


def _jobs(layout: RawLayout, voc_root: Path, tune_split) -> dict[str, list[tuple[str, str, str, str]]]:
    """split -> (split, id, image path, mask path) for every listed id (plus the tune split)."""
    jobs: dict[str, list[tuple[str, str, str, str]]] = {}
    for split, rel in layout.splits.items():
        list_file = voc_root / rel
        if not list_file.is_file():
            raise UserError(f"split list {list_file} is missing: re-run `segpipe fetch` (data.dir)")
        jobs[split] = [
            (split, sid, str(voc_root / layout.image_dir / f"{sid}.jpg"), str(voc_root / layout.masks(split) / f"{sid}.png"))
            for sid in read_id_list(list_file)
        ]
        if not jobs[split]:
            raise UserError(f"split list {list_file} is empty (data.source)")
    # ids unique per list, val disjoint from train: before any image is read (data.checks)
    check_id_lists({s: [j[1] for j in js] for s, js in jobs.items()},
                   {s: str(voc_root / rel) for s, rel in layout.splits.items()}, "data.source")
    tune_ids = tune_split_ids([j[1] for j in jobs.get("train", [])], tune_split)
    if tune_ids:  # its own split, rows copied from train: trials train on train-tune and select on tune
        jobs["tune"] = [("tune", *j[1:]) for j in jobs["train"] if j[1] in tune_ids]
    return jobs


def _pool_worker_signals() -> None:
    """A forked pool worker ends on SIGTERM (Pool.terminate sends it) instead of running the CLI's
    handler (pipeline.system.handle_sigterm), which would leave it holding the pool's queue lock;
    Ctrl-C is the parent's to handle."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _preprocess(p: Params, progress: bool = True) -> dict:
    data_dir = Path(p.data.dir)
    raw = data_dir / "raw"
    layout = RawLayout.load(raw)
    jobs = _jobs(layout, layout.root(raw), p.data.tune_split)
    new_dir = data_dir / ".shards-new"
    if new_dir.exists():
        shutil.rmtree(new_dir)
    workers = p.data.workers or os.cpu_count() or 1
    manifest: dict = {"version": MANIFEST_VERSION, "source": layout.source, "splits": {}, "shards": {},
                      # which list the train split is (train_aug = VOC train + SBD, the recipe's data)
                      "train_list": Path(layout.splits.get("train", "")).stem, "train_from": layout.train_from}
    pool = mp.get_context("fork").Pool(workers, initializer=_pool_worker_signals) if workers > 1 else None
    try:
        errors = _write_splits(p, jobs, new_dir, manifest, pool, progress)
        if errors:  # the first few, each cut short: one line however many pairs are bad
            more = f"; ... and {len(errors) - 5} more" if len(errors) > 5 else ""
            raise UserError(
                f"{len(errors)} bad image/mask pair(s), no shards written (earlier shards untouched): "
                + "; ".join(e if len(e) <= 120 else e[:117] + "..." for e in errors[:5]) + more
            )
        (new_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        storage.swap_in(new_dir, data_dir / "shards", "data.dir", SHARDS_LEGACY)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if new_dir.exists():
            shutil.rmtree(new_dir, ignore_errors=True)
    return manifest


def _write_splits(p: Params, jobs: dict, new_dir: Path, manifest: dict, pool, progress: bool) -> list[str]:
    """Validate every pair (in ``pool`` when given) and write each split's shards into ``new_dir``,
    filling manifest["splits"] / ["shards"]. Returns the bad pairs ("split/id: why"); once one is
    found nothing more is written, the rest are only validated."""
    errors: list[str] = []
    with tqdm(total=sum(len(j) for j in jobs.values()), desc="preprocess", unit="img", disable=not progress) as bar:
        for split, split_jobs in jobs.items():
            writer = ShardWriter(new_dir / split, p.data.row_group_rows, p.data.shard_max_mb * 2**20)
            hist = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
            results = pool.imap(load_pair, split_jobs, chunksize=4) if pool else map(load_pair, split_jobs)
            for res in results:
                bar.update()
                if "error" in res:
                    errors.append(f"{res['split']}/{res['id']}: {res['error']}")
                    continue
                if not errors:  # once a pair is bad nothing is kept: only validate the rest
                    hist += np.asarray(res.pop("hist"), dtype=np.int64)
                    writer.add(res)
            parts = writer.close() if not errors else []
            manifest["splits"][split] = {
                "count": sum(rows for _, rows in parts),
                "class_pixels": dict(zip(list(VOC_CLASSES) + ["void"], hist.tolist())),
            }
            for path, rows in parts:
                manifest["shards"][f"{split}/{path.name}"] = {"rows": rows, "bytes": path.stat().st_size,
                                                             "sha256": sha256sum(path)}
    return errors


def train_split_line(manifest: dict) -> str:
    """Which train list the shards hold, in one line (printed by fetch/preprocess)."""
    lst, n = manifest.get("train_list", "train"), manifest["splits"].get("train", {}).get("count", 0)
    line = f"train split: {lst} ({n} images, from {manifest.get('train_from', 'VOC train.txt')})"
    if lst == "train" and manifest.get("source") not in ("synthetic", "sample"):
        line += ("; the recipe trains on train_aug (10,582): set data.sbd_source to a local SBD "
                 "(benchmark.tgz or its dir) or a SegmentationClassAug folder")
    return line
