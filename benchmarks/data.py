"""Scratch data for the benchmarks: VOC-layout synthetic scenes at a real VOC size, their shards,
and a local Ray of the benchmark's own."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import DataParams, Params, SyntheticParams
from pipeline.data.palette import save_mask_png
from pipeline.data.synthetic import make_scene
from pipeline.system import ray_init


def make_voc(root: Path, n_train: int, n_val: int, height: int = 375, width: int = 500, pool: int = 32,
             seed: int = 0) -> Path:
    """A VOC2012-layout dir (root/VOCdevkit/VOC2012) of synthetic scenes at a real VOC size
    (500x375 JPEG q90, ~70 KB, palette PNG masks). `pool` distinct scenes are drawn and hard-linked
    under all the ids: decoding cost does not depend on the content repeating."""
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    pool_dir = root / "pool"
    pool_dir.mkdir(exist_ok=True)
    sp = SyntheticParams(size=max(height, width), seed=seed, max_objects=4, classes=list(range(1, 21)))
    pool = max(1, min(pool, n_train + n_val))
    for k in range(pool):
        jpg, png = pool_dir / f"{k}.jpg", pool_dir / f"{k}.png"
        if jpg.is_file() and png.is_file():
            continue
        data, mask = make_scene(k, sp)
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[:height, :width]
        Image.fromarray(arr).save(jpg, format="JPEG", quality=90)
        save_mask_png(np.ascontiguousarray(mask[:height, :width]), png)
    ids = {"train": [f"2012_{i:06d}" for i in range(n_train)],
           "val": [f"2012_{i:06d}" for i in range(n_train, n_train + n_val)]}
    for i, sid in enumerate(ids["train"] + ids["val"]):
        for src, dst in ((pool_dir / f"{i % pool}.jpg", voc / "JPEGImages" / f"{sid}.jpg"),
                         (pool_dir / f"{i % pool}.png", voc / "SegmentationClass" / f"{sid}.png")):
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    dst.write_bytes(src.read_bytes())
    sets = voc / "ImageSets" / "Segmentation"
    for split, names in ids.items():
        (sets / f"{split}.txt").write_text("\n".join(names) + "\n")
    (sets / "trainval.txt").write_text("\n".join(ids["train"] + ids["val"]) + "\n")
    return root


def make_shards(voc_root: Path, data_dir: Path, workers: int = 0):
    """fetch (read in place) + preprocess, as `segpipe fetch/preprocess -S data.source=<voc_root>` do."""
    from pipeline.data.sources import fetch  # the stages' own functions, as `segpipe fetch/preprocess` run them
    from pipeline.data.shards import preprocess

    p = Params(data=DataParams(source=str(voc_root), dir=str(data_dir), workers=workers, tune_split=0))  # train + val only
    fetch(p, progress=False)
    return preprocess(p, progress=False)


def start_local_ray(num_cpus: int, tmp: Path):
    """(ray, owned): the Ray this process is already connected to (e.g. a test's), or a new local one
    of our own with its own temp dir, which the caller shuts down when `owned`."""
    import ray

    return ray, ray_init(num_cpus=num_cpus, temp_dir=tmp, log_to_driver=False)
