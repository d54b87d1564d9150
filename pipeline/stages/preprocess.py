"""Validate every image/mask pair and write Parquet shards + manifest.json.

Reads <data.dir>/raw/, validates every pair on all cores (undecodable or truncated images,
mask values outside 0..20/255, size mismatches, ids without a mask: all reported at once),
writes <data.dir>/shards/<split>/part-NNNNN.parquet (original JPEG bytes, PNG masks, row
groups <= data.row_group_rows) and shards/manifest.json. Old shards stay until the new set
is complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run(p, args) -> int:
    from pipeline.data.shards import preprocess, train_split_line

    manifest = preprocess(p, progress=not getattr(args, "quiet", False))
    counts = ", ".join(f"{info['count']} {split}" for split, info in manifest["splits"].items())
    log.info(f"preprocessed {manifest['source']}: {counts} in {len(manifest['shards'])} shard(s) -> "
             f"{Path(p.data.dir) / 'shards'}")
    log.info(train_split_line(manifest))
    return 0
