"""`segpipe bench verify`: the cost of the shard check (data.verify_shards) vs one loader pass."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import Scratch, goal, median, report
from benchmarks.data import make_shards, make_voc


def bench_verify(args, out: Path) -> dict:
    """The cost of train/tune's shard check (pipeline.data.verify_shards: size, rows, sha256 of
    every shard) against one loader-only pass over the same shards (decode + train transform at
    --crop, one process: a lower bound on a training epoch), and its throughput in GB/s."""
    import shutil

    from pipeline.data.loaders import ShardDataset, verify_shards
    from pipeline.data.transforms import train_transform

    n = args.images or (40 if args.quick else 400)
    crop = args.crop or 513
    rounds = args.repeats or (1 if args.quick else 3)
    with Scratch(args.workdir, "verify") as work:
        make_voc(work / "voc", n, max(1, n // 10), pool=32)
        shutil.rmtree(work / "voc" / "pool")
        make_shards(work / "voc", work / "data", workers=1)
        verify_s, epoch_s = [], []
        got = {}
        for _ in range(rounds):
            got = verify_shards(work / "data")
            verify_s.append(got["seconds"])
            ds = ShardDataset(work / "data", "train", transform=train_transform(crop))
            t = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            epoch_s.append(time.perf_counter() - t)
        v, e = median(verify_s), median(epoch_s)
        gb = got["bytes"] / 1e9
        full_voc_gb = gb / (n + max(1, n // 10)) * (10582 + 1449)  # train_aug + val at this image size
    rows = [["verify_shards (size, rows, sha256)", got["shards"], round(gb * 1000, 1), round(v, 3), round(gb / v, 2)],
            [f"one loader pass over train (decode + crop {crop}, 1 process)", len(ds), "-", round(e, 3), "-"]]
    goals = [goal("verify time / loader-only epoch", v / e, 0.05, higher_is_better=False),
             goal("verify throughput GB/s", gb / v, None)]
    notes = [f"full VOC train_aug + val (~{full_voc_gb:.2f} GB of shards at this image size): verify takes "
             f"~{full_voc_gb / (gb / v):.1f} s before Ray starts (data.verify_shards: false skips it)",
             "a real epoch also runs the model forward/backward: the ratio to it is far smaller"]
    return report("verify", out, ["what", "shards/images", "MB", "seconds (median)", "GB/s"], rows, goals,
                  {"images": n, "crop": crop, "rounds": rounds}, notes)
