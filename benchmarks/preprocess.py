"""`segpipe bench preprocess`: 1 process vs all cores, and peak RSS at two set sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Scratch, goal, median, report
from benchmarks.data import make_voc
from pipeline.errors import UserError
from pipeline.storage import REPO as ROOT


_PREPROCESS_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from pipeline.config import load_params
from pipeline.data.shards import preprocess
p = load_params(sys.argv[1])
t1 = time.perf_counter()
manifest = preprocess(p, progress=False)
t2 = time.perf_counter()
cpu = sum(getattr(resource.getrusage(w), k) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
          for k in ("ru_utime", "ru_stime"))
print(json.dumps({"import_s": t1 - t0, "seconds": t2 - t1, "cpu_s": cpu,
                  "maxrss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "maxrss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "count": sum(s["count"] for s in manifest["splits"].values())}))
"""


def _preprocess_run(params: Path, env: dict) -> dict:
    """`preprocess` in a fresh process (timed inside it, imports excluded) while the RSS of its process
    tree (main + pool workers) is sampled every 20 ms; the kernel's maxrss of the main process and
    of its largest worker come back too."""
    proc = subprocess.Popen([sys.executable, "-c", _PREPROCESS_CHILD, str(params)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak_tree = 0.0
    try:
        import psutil

        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak_tree = max(peak_tree, total / 2**20)
            time.sleep(0.02)
    except ImportError:
        peak_tree = float("nan")
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise UserError(f"preprocess failed in the benchmark: {err.strip()[-500:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_tree_mib"] = peak_tree
    return res


def bench_preprocess(args, out: Path) -> dict:
    import shutil

    import yaml

    from pipeline.config import load_params
    from pipeline.data.sources import fetch

    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([60, 180] if args.quick else [1000, 3000])
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise UserError("--sizes takes two or more positive counts, e.g. 1000,3000 (--sizes)")
    sizes = sorted(sizes)
    rounds = args.repeats or (1 if args.quick else 2)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    rows, goals, notes = [], [], []
    with Scratch(args.workdir, "preprocess") as work:
        t0 = time.perf_counter()
        make_voc(work / "voc", sizes[-1], 0, pool=32)
        shutil.rmtree(work / "voc" / "pool")
        jpeg_kb = sum(f.stat().st_size for f in list((work / "voc/VOCdevkit/VOC2012/JPEGImages").iterdir())[:32]) / 32 / 1024
        print(f"data: {sizes[-1]} images 500x375 (~{jpeg_kb:.0f} KB JPEG) in {time.perf_counter() - t0:.1f}s", flush=True)
        voc = work / "voc" / "VOCdevkit" / "VOC2012"
        all_ids = (voc / "ImageSets/Segmentation/train.txt").read_text().split()

        fetched_sets: set[int] = set()

        def run_one(n: int, workers: int) -> dict:
            root, data = work / f"set{n}", work / f"data{n}"
            sub = root / "VOCdevkit" / "VOC2012"
            if not sub.exists():  # same image files, an id list of n (train n - n//10, val n//10)
                (sub / "ImageSets/Segmentation").mkdir(parents=True)
                for d in ("JPEGImages", "SegmentationClass"):
                    (sub / d).symlink_to(voc / d)
                n_val = max(1, n // 10)
                (sub / "ImageSets/Segmentation/train.txt").write_text("\n".join(all_ids[:n - n_val]) + "\n")
                (sub / "ImageSets/Segmentation/val.txt").write_text("\n".join(all_ids[n - n_val:n]) + "\n")
            params = work / f"params{n}-{workers}.yaml"
            params.write_text(yaml.safe_dump({"data": {"source": str(root), "dir": str(data), "workers": workers, "tune_split": 0}}))
            if n not in fetched_sets:  # a VOC dir source: fetch only records where it is
                fetch(load_params(params), progress=False)
                fetched_sets.add(n)
            r = _preprocess_run(params, env)
            if r["count"] != n:
                raise UserError(f"preprocess wrote {r['count']} images, expected {n}")
            res = {"images": n, "workers": workers or cores, "seconds": round(r["seconds"], 2),
                   "img_per_s": round(n / r["seconds"], 1), "cpu_ms_per_img": round(1000 * r["cpu_s"] / n, 2),
                   "peak_rss_tree_mib": round(r["peak_rss_tree_mib"], 1), "peak_rss_main_mib": round(r["maxrss_self_mib"], 1),
                   "peak_rss_worker_mib": round(r["maxrss_children_mib"], 1)}
            print(f"  {n} images, {workers or cores} process(es): {res['img_per_s']:7.1f} img/s, "
                  f"{res['cpu_ms_per_img']:.2f} CPU ms/img, peak RSS: tree {res['peak_rss_tree_mib']:5.0f} MiB, main "
                  f"{res['peak_rss_main_mib']:5.0f} MiB, largest worker {res['peak_rss_worker_mib']:5.0f} MiB", flush=True)
            return res

        runs = []
        for r in range(rounds):  # 1 process vs all cores, alternating which goes first
            for workers in ((1, 0) if r % 2 == 0 else (0, 1)):
                runs.append(run_one(sizes[0], workers))
        for n in sizes[1:]:
            runs.append(run_one(n, 0))
    one = [r for r in runs if r["workers"] == 1]
    alls = {n: [r for r in runs if r["workers"] > 1 and r["images"] == n] or [r for r in runs if r["images"] == n]
            for n in sizes}
    columns = ["images", "processes", "runs", "img/s", "CPU ms / img", "peak RSS tree MiB", "main MiB", "largest worker MiB"]
    agg = lambda rs, k: round(median([r[k] for r in rs]), 2)
    rows.append([sizes[0], 1, len(one), agg(one, "img_per_s"), agg(one, "cpu_ms_per_img"), agg(one, "peak_rss_tree_mib"),
                 agg(one, "peak_rss_main_mib"), "-"])
    for n in sizes:
        rs = alls[n]
        rows.append([n, rs[0]["workers"], len(rs), agg(rs, "img_per_s"), agg(rs, "cpu_ms_per_img"),
                     agg(rs, "peak_rss_tree_mib"), agg(rs, "peak_rss_main_mib"),
                     agg(rs, "peak_rss_worker_mib") if rs[0]["workers"] > 1 else "-"])
    pairs = [(runs[i], runs[i + 1]) for i in range(0, 2 * rounds, 2)]
    speedup = median([(a if a["workers"] > 1 else b)["img_per_s"] / (b if a["workers"] > 1 else a)["img_per_s"] for a, b in pairs])
    goals.append(goal(f"preprocess: all cores ({cores} processes) / 1 process (img/s, median of rounds)", speedup, None))
    first, last = alls[sizes[0]], alls[sizes[-1]]
    goals.append(goal(f"preprocess: peak RSS of the process tree at {sizes[-1]} / at {sizes[0]} images",
                      agg(last, "peak_rss_tree_mib") / agg(first, "peak_rss_tree_mib"), 1.15, False))
    goals.append(goal(f"preprocess: peak RSS of the main process at {sizes[-1]} / at {sizes[0]} images",
                      agg(last, "peak_rss_main_mib") / agg(first, "peak_rss_main_mib"), 1.15, False))
    notes.append("Each run is preprocess() in a fresh process (after `segpipe fetch` of a VOC dir, read in place), "
                 "timed inside it (imports excluded); CPU ms / img counts the main process and its pool workers; the "
                 "tree RSS sums them (shared pages counted in each), sampled every 20 ms; main / largest worker are "
                 "the kernel's maxrss.")
    notes.append(f"{cores} usable cores{' shared with other work' if os.getloadavg()[0] > cores else ''}: the main process "
                 "(collecting rows, writing Parquet) runs beside the pool workers, so all cores = "
                 f"{cores} workers + the writer.")
    settings = {"sizes": sizes, "cores": cores, "rounds": rounds, "image_size": [375, 500]}
    return report("preprocess", out, columns, rows, goals, settings, notes, extra={"runs": runs})
