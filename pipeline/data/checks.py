"""The data a run trains on, checked against itself before Ray starts (train, train --all, tune).

check_shards(data_dir, manifest) refuses, with one `error:` line naming data.dir:
- a split the run needs (train, val) that is empty, or whose manifest count differs from the rows of
  the shards the manifest lists for it (a manifest edited by hand, or shards of another preprocess);
- an id listed twice within a split;
- an id in both train and val, or in both the tuning split and val: a model would be scored on
  images it trained on.
Only the `id` column of each shard is read (a few KB per shard, local or remote).

Preprocess refuses the same faults in the id lists before it writes a shard
(pipeline.data.shards._jobs -> check_id_lists), so shards it wrote pass; these checks catch what
changed after it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline import storage
from pipeline.errors import UserError

NEEDED = ("train", "val")
SHOWN = 5  # ids named in a message; the count says how many there are


def _first(ids) -> str:
    ids = sorted(ids)
    more = f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""
    return ", ".join(ids[:SHOWN]) + more


def check_id_lists(lists: dict[str, list[str]], where: dict[str, str], knob: str) -> None:
    """Ids unique within each list; val disjoint from train (and from tune). `where`: split -> the
    file the list came from (named in the message)."""
    for split, ids in lists.items():
        repeated = [i for i, n in Counter(ids).items() if n > 1]
        if repeated:
            raise UserError(f"{where.get(split, split)} lists {len(repeated)} id(s) more than once ({_first(repeated)}): "
                            f"each image may be listed once ({knob})")
    val = set(lists.get("val", ()))
    for split in ("train", "tune"):
        both = val & set(lists.get(split, ()))
        if both:
            raise UserError(f"{len(both)} id(s) of the val list {where.get('val', 'val')} are also in the {split} "
                            f"list {where.get(split, split)} ({_first(both)}): a model would be scored on images it "
                            f"trained on; remove them from one of the lists ({knob})")


def split_ids(data_dir: str | Path, manifest: dict, split: str) -> list[str]:
    """The ids of one split, read from the id column of the shards the manifest lists for it."""
    from pipeline.data.loaders import shard_dir

    root = shard_dir(data_dir)
    ids: list[str] = []
    for rel in sorted(r for r in manifest["shards"] if r.split("/", 1)[0] == split):
        try:
            table = storage.open_parquet(storage.join(root, rel)).read(columns=["id"])
        except Exception:
            raise UserError(f"shard {storage.join(root, rel)} is missing or not a readable Parquet file: "
                            f"re-run `segpipe preprocess` (data.dir)") from None
        ids.extend(table.column("id").to_pylist())
    return ids


def check_shards(data_dir: str | Path, manifest: dict, splits: tuple[str, ...] = ("train", "val", "tune")) -> dict:
    """Every needed split non-empty and as large as its shards; ids unique and val disjoint.
    Returns split -> number of images."""
    fix = "re-run `segpipe preprocess` (data.dir)"
    counts = {}
    for split in splits:
        info = manifest["splits"].get(split)
        if info is None and split not in NEEDED:
            continue
        count = info.get("count", 0) if isinstance(info, dict) else 0
        listed = sum(e.get("rows", 0) for r, e in manifest["shards"].items()
                     if r.split("/", 1)[0] == split and isinstance(e, dict))
        if count <= 0 or listed <= 0:
            raise UserError(f"the {split} split of {data_dir}/shards is empty (manifest.json counts {count} images "
                            f"in {listed} listed rows): {fix}")
        if listed != count:
            raise UserError(f"manifest.json of {data_dir}/shards counts {count} {split} images but lists shards "
                            f"of {listed} rows: {fix}")
        counts[split] = count
    lists = {s: split_ids(data_dir, manifest, s) for s in counts}
    check_id_lists(lists, {s: f"{data_dir}/shards/{s}" for s in lists}, "data.dir")
    return counts
