"""Speed benchmarks (loader, preprocess, model, ray, pipeline, gpu) as ratios to a baseline.

Each benchmark times ours against a baseline in the same run, prints a table and the ratio, and
writes <out>/<what>.json (with machine info) and bench.md beside <out> (default reports/bench).
loader: our shard loader vs torchvision VOCSegmentation (same images, augmentation, workers) and Ray
Data; preprocess: 1 vs all cores, peak RSS at two sizes; model: ours vs torchvision's identical
models (channels_last, --compile); ray: Ray Train loop vs a plain loop, 1 vs 2 workers; pipeline:
each DVC stage of the quickstart and a no-op dvc repro; gpu: benchmarks/gpu_bench.py (pure torch,
CUDA). Defaults take under ~2 minutes each on CPU (pipeline: the whole quickstart with 2 epochs);
--quick only checks that it runs.
"""

# How it works (developer notes):
# measured in the same run, and write <out>/<what>.json (machine info included) and <out>/../bench.md.
#
#   loader      decode + train-augmentation images/s of the loader `segpipe train` builds (Parquet
#               shards, fused uint8 augmentation) vs torchvision.datasets.VOCSegmentation over the
#               same JPEG/PNG files with the same augmentation (torchvision.transforms.v2, step by step)
#               and the same DataLoader workers; also our shards with the step-by-step transform (the
#               loader before this benchmark) and the Ray Data path (ray.data.read_parquet over the shards).
#               Images are synthetic VOC-like 500x375 JPEGs.
#   preprocess  `segpipe preprocess` images/s with 1 process vs all cores, and the peak RSS at two
#               set sizes (it must stay flat as the set grows).
#   model       forward+backward and inference ms/batch of our models vs torchvision's identical
#               ones (same weights), channels_last off/on, torch.compile off/on (--compile).
#   ray         img/s of the Ray Train loop (pipeline.train.fit) vs a plain single-process loop
#               (pipeline.training.engine) on the same data and model; 1 vs 2 workers.
#   pipeline    wall-clock of each DVC stage of the quickstart (2 epochs unless --full) in a scratch
#               copy of the repo, then of a no-op `dvc repro`.
#   gpu         benchmarks/gpu_bench.py: pure-torch training of each family at the full recipe's crop
#               and batch, AMP + channels_last (+ --compile), beside torchvision's model (CUDA GPU).
#   md          only rewrite <out>/../bench.md from the <what>.json files in <out>.
#
# Timings on a shared machine are noisy: every ratio compares runs interleaved in the same process,
# and medians are reported. Nothing here asserts a speed; the goals are printed as met / not met.

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.storage import REPO
from pipeline.system import machine_info  # noqa: F401  (gpu_bench imports it from here)

NEEDS_PARAMS = False
WHAT = ("loader", "preprocess", "model", "ray", "pipeline", "gpu", "verify", "md")
ROOT = REPO
TV_IDENTICAL = ("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")


def add_arguments(parser) -> None:
    parser.add_argument("what", choices=WHAT, help="which benchmark: " + ", ".join(WHAT))
    parser.add_argument("--out", default="reports/bench", metavar="DIR",
                        help="where <what>.json goes; bench.md is written beside DIR (default reports/bench)")
    parser.add_argument("--name", help="write <out>/<name>.json instead of <what>.json (e.g. to keep a 'before' run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, figures mean little")
    parser.add_argument("--workdir", metavar="DIR", help="scratch data goes here (default: a temp dir, removed after)")
    g = parser.add_argument_group("sizes (defaults keep each CPU benchmark under ~2 minutes)")
    g.add_argument("--images", type=int, metavar="N", help="loader: train images (320); ray: train images (64)")
    g.add_argument("--sizes", metavar="N,N", help="preprocess: set sizes for the RSS check (1000,3000)")
    g.add_argument("--workers", type=int, metavar="N", help="loader: DataLoader workers (2)")
    g.add_argument("--batch-size", type=int, metavar="N", help="loader 8, model 2, ray 8, gpu 8")
    g.add_argument("--crop", type=int, metavar="PX", help="loader 513, model 96, ray 96, gpu 513")
    g.add_argument("--repeats", type=int, metavar="N", help="timed rounds, interleaved (loader 5, model 4, preprocess 2)")
    g.add_argument("--epochs", type=int, metavar="N", help="ray: epochs per run (4); pipeline: train.epochs (2)")
    g.add_argument("--models", metavar="A,B", help="model/gpu: registry names to time "
                                                    f"(model default: {','.join(TV_IDENTICAL)})")
    g.add_argument("--compile", action="store_true", help="model/gpu: also time torch.compile (minutes on CPU)")
    g.add_argument("--no-ray", action="store_true", help="loader: skip the Ray Data path")
    g.add_argument("--ray-workers", default="1,2", metavar="N,N", help="ray: Ray Train worker counts to run (1,2)")
    g.add_argument("--full", action="store_true", help="pipeline: the quickstart profile as it is (8 epochs)")
    g.add_argument("--stages", metavar="A,B", help="pipeline: only these DVC stages (and the no-op repro of them)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="model: where to run (auto); gpu: cpu only checks that it runs")
    g.add_argument("--threads", type=int, metavar="N", help="model, ray: torch threads per process (CPU default 1)")


# --------------------------------------------------------------------------------- reporting

def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def format_table(columns: list[str], rows: list[list]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(columns)]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line([str(h) for h in columns]), line(["-" * w for w in widths]), *map(line, cells)])


def goal(name: str, value: float, target: float | None, higher_is_better: bool = True) -> dict:
    """A figure and the goal it is held to (target None: a figure shown without a goal)."""
    met = None if target is None else bool(value >= target if higher_is_better else value <= target)
    return {"name": name, "value": round(value, 3), "target": target,
            "op": ">=" if higher_is_better else "<=", "met": met}


def goal_text(g: dict, md: bool = False) -> str:
    if g["target"] is None:
        return f"{g['value']:.3f}"
    verdict = "met" if g["met"] else ("**not met**" if md else "NOT met")
    return f"{g['value']:.3f} (goal {g['op']} {g['target']}: {verdict})"


def command_line(what: str) -> str:
    """`segpipe bench <what> ...` as it was typed (from sys.argv when it holds the bench call), less
    --out / --workdir (where results and scratch data went does not change them)."""
    argv = sys.argv[1:]
    if "bench" not in argv or what not in argv[argv.index("bench"):]:
        return f"segpipe bench {what}"
    rest, it = [], iter(argv[argv.index("bench") + 1:])
    for a in it:
        if a in ("--out", "--workdir"):
            next(it, None)
        elif not a.startswith(("--out=", "--workdir=")):
            rest.append(a)
    return "segpipe bench " + " ".join(rest)


RESULT_NAME: dict[str, str] = {}  # --name: the result file's name instead of <what>


def report(what: str, out: Path, columns: list[str], rows: list[list], goals: list[dict], settings: dict,
           notes: list[str], extra: dict | None = None, command: str | None = None, md: bool = True) -> dict:
    """Print the table + goals, write <out>/<what>.json atomically, rewrite bench.md beside <out>."""
    print()
    print(format_table(columns, rows))
    for g in goals:
        print(f"{g['name']}: {goal_text(g)}")
    for n in notes:
        print(f"note: {n}")
    name = RESULT_NAME.get("name") or what
    payload = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "command": command or command_line(what), "machine": machine_info(), "settings": settings,
               "table": {"columns": columns, "rows": rows}, "goals": goals, "notes": notes, **(extra or {})}
    write_json(out / f"{name}.json", payload)
    if md:
        write_markdown(out)
    print(f"wrote {out / f'{name}.json'}" + (f" and {out.parent / 'bench.md'}" if md else ""))
    return payload


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def write_markdown(out: Path, path: Path | None = None) -> Path:
    """bench.md (beside `out` unless `path`): every <what>.json in `out`, in a fixed order, as tables."""
    lines = ["# Benchmarks", "",
             f"Written by `segpipe bench <what>` from [{out.name}/]({out.name}/) (one JSON per benchmark, with the "
             "machine it ran on). Ratios compare runs measured in the same process, interleaved; on a shared "
             "machine absolute figures move, the ratios much less.", ""]
    extra = sorted(f.stem for f in out.glob("*.json") if f.stem not in WHAT) if out.is_dir() else []
    for what in [*WHAT, *extra]:
        src = out / f"{what}.json"
        if not src.is_file():
            continue
        try:
            d = json.loads(src.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        m = d.get("machine", {})
        where = m.get("gpu") or m.get("cpu", "?")
        lines += [f"## {what}", "",
                  f"`{d.get('command', 'segpipe bench ' + what)}` — {d.get('created', '?')}, {where}, "
                  f"{m.get('cpus_usable', m.get('cpu_count', '?'))} cores, torch {m.get('torch', '?')}, "
                  f"load {m.get('loadavg', '?')}", ""]
        t = d.get("table", {})
        cols = t.get("columns", [])
        if cols:
            lines.append("| " + " | ".join(cols) + " |")
            numeric = [all(isinstance(r[i], (int, float)) or r[i] in (None, "-") for r in t.get("rows", []) if i < len(r))
                       for i in range(len(cols))]
            lines.append("|" + "|".join("---:" if num else "---" for num in numeric) + "|")
            for r in t.get("rows", []):
                lines.append("| " + " | ".join(fmt(c) for c in r) + " |")
            lines.append("")
        for g in d.get("goals", []):
            lines.append(f"- **{g['name']}**: {goal_text(g, md=True)}")
        for n in d.get("notes", []):
            lines.append(f"- {n}")
        lines.append("")
    path = path or out.parent / "bench.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Scratch:
    """--workdir or a temp dir removed at the end."""

    def __init__(self, workdir: str | None, prefix: str):
        self.keep = workdir is not None
        self.path = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix=f"segpipe-bench-{prefix}-"))
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc):
        if not self.keep:
            import shutil

            shutil.rmtree(self.path, ignore_errors=True)


# --------------------------------------------------------------------------------- data

def make_voc(root: Path, n_train: int, n_val: int, height: int = 375, width: int = 500, pool: int = 32,
             seed: int = 0) -> Path:
    """A VOC2012-layout dir (root/VOCdevkit/VOC2012) of synthetic scenes at a real VOC size
    (500x375 JPEG q90, ~70 KB, palette PNG masks). `pool` distinct scenes are drawn and hard-linked
    under all the ids: decoding cost does not depend on the content repeating."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.config import SyntheticParams
    from pipeline.data.palette import save_mask_png
    from pipeline.data.synthetic import make_scene

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
    from pipeline.config import DataParams, Params
    from pipeline.data.sources import fetch
    from pipeline.data.shards import preprocess

    p = Params(data=DataParams(source=str(voc_root), dir=str(data_dir), workers=workers))
    fetch(p, progress=False)
    return preprocess(p, progress=False)


def start_local_ray(num_cpus: int, tmp: Path):
    """(ray, owned): the Ray this process is already connected to (e.g. a test's), or a new local one
    of our own with its own temp dir, which the caller shuts down when `owned`."""
    import ray

    from pipeline.system import ray_init

    return ray, ray_init(num_cpus=num_cpus, temp_dir=tmp, log_to_driver=False)


# --------------------------------------------------------------------------------- loader

class ReferenceTrainTransform:
    """The train augmentation as separate torchvision.transforms.v2 steps -- what one writes with
    torchvision: resize the whole image by a random factor, flip, pad, crop, ToDtype + Normalize.
    Same distribution as pipeline.data.train_transform (which fuses them, see RandomScaleCrop);
    the loaders' baseline, and pipeline.data.loaders's train transform before `segpipe bench loader`."""

    def __init__(self, crop: int, scale_min: float = 0.5, scale_max: float = 2.0):
        import torch
        from torchvision.transforms import v2

        from pipeline.data import transforms as D

        self.lo, self.hi = scale_min, scale_max
        self.flip, self.pad, self.crop = v2.RandomHorizontalFlip(), D.PadTo(crop), v2.RandomCrop(crop)
        self.to_float = v2.ToDtype(torch.float32, scale=True)
        self.norm = v2.Normalize(D.IMAGENET_MEAN, D.IMAGENET_STD)

    def __call__(self, image, mask):
        import random

        import torch
        from torchvision.transforms.v2 import functional as TF

        s = random.uniform(self.lo, self.hi)
        h, w = image.shape[-2:]
        size = [max(1, round(h * s)), max(1, round(w * s))]
        image, mask = TF.resize(image, size, antialias=True), TF.resize(mask, size)  # mask: nearest (a Mask)
        image, mask = self.crop(*self.pad(*self.flip(image, mask)))
        return self.norm(self.to_float(image)).as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def reference_train_transform(crop: int, scale_min: float = 0.5, scale_max: float = 2.0) -> ReferenceTrainTransform:
    return ReferenceTrainTransform(crop, scale_min, scale_max)


class PILPair:
    """VOCSegmentation `transforms`: (PIL image, PIL mask) -> tv_tensors, then `transform`."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, mask):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        return self.transform(tv_tensors.Image(TF.pil_to_tensor(image)), tv_tensors.Mask(TF.pil_to_tensor(mask)[0]))


class AugmentBatch:
    """Ray Data map_batches: JPEG/PNG bytes -> the train augmentation -> stacked arrays."""

    def __init__(self, crop: int, scale_min: float, scale_max: float):
        self.crop, self.scale_min, self.scale_max = crop, scale_min, scale_max

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        from torchvision import tv_tensors

        from pipeline.data.loaders import decode_image, decode_mask; from pipeline.data.transforms import train_transform

        t = train_transform(self.crop, self.scale_min, self.scale_max, normalize=False)  # as segpipe train's loader
        pairs = [t(tv_tensors.Image(decode_image(i)), tv_tensors.Mask(decode_mask(m)))
                 for i, m in zip(batch["image"], batch["mask"])]
        return {"image": np.stack([x.numpy() for x, _ in pairs]), "mask": np.stack([y.numpy() for _, y in pairs])}


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (DataLoader workers are joined
    at the end of each epoch, so their time is in)."""
    import resource

    return sum(getattr(resource.getrusage(w), k) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for k in ("ru_utime", "ru_stime"))


def _epoch_rate(make_loader, epoch: int) -> tuple[float, float, float]:
    """(images/s over one epoch, images per CPU-second, seconds to the first batch), the loader
    built inside the timing."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    loader = make_loader(epoch)
    n, first = 0, None
    for images, _ in loader:
        if first is None:
            first = time.perf_counter() - t0
        n += images.shape[0]
    wall = time.perf_counter() - t0
    del loader
    return n / wall, n / max(1e-9, _cpu_seconds() - c0), first or 0.0


def bench_loader(args, out: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import VOCSegmentation

    from pipeline.data.loaders import BlockShuffleSampler, ShardDataset; from pipeline.data.transforms import train_transform
    from pipeline.stages.train import build_loaders

    n = args.images or (48 if args.quick else 200)
    workers = args.workers if args.workers is not None else (0 if args.quick else 2)
    batch = args.batch_size or (4 if args.quick else 8)
    crop = args.crop or (128 if args.quick else 513)
    rounds = args.repeats or (1 if args.quick else 5)
    scale = (0.5, 2.0)
    pin = torch.cuda.is_available()
    with Scratch(args.workdir, "loader") as work:
        t0 = time.perf_counter()
        make_voc(work / "voc", n, max(4, batch), pool=min(32, n))
        make_shards(work / "voc", work / "data")
        print(f"data: {n} train images 500x375 (VOC layout + shards) in {time.perf_counter() - t0:.1f}s; "
              f"batch {batch}, crop {crop}, {workers} DataLoader worker(s), {rounds} round(s)", flush=True)
        cfg = {"data_dir": str(work / "data"), "crop_size": crop, "eval_size": crop, "scale_min": scale[0],
               "scale_max": scale[1], "seed": 0, "batch_size": batch, "loader_workers": workers}
        tv_ds = VOCSegmentation(str(work / "voc"), year="2012", image_set="train",
                                transforms=PILPair(reference_train_transform(crop, *scale)))
        tv_loader = DataLoader(tv_ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, pin_memory=pin)

        def before(epoch):
            ds = ShardDataset(cfg["data_dir"], "train", reference_train_transform(crop, *scale))
            sampler = BlockShuffleSampler(ds, seed=0)
            sampler.set_epoch(epoch)
            return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True, pin_memory=pin)

        def fused_float(epoch):
            ds = ShardDataset(cfg["data_dir"], "train", train_transform(crop, *scale))
            sampler = BlockShuffleSampler(ds, seed=0)
            sampler.set_epoch(epoch)
            return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True, pin_memory=pin)

        loaders = {
            "torchvision VOCSegmentation + v2 steps": lambda epoch: tv_loader,
            "ours: shards + v2 steps (before)": before,
            "ours: shards + fused, float out": fused_float,
            "ours: shards + fused, uint8 out (segpipe train)": lambda epoch: build_loaders(cfg, 0, 1, epoch)[0],
        }
        rates: dict[str, list[float]] = {k: [] for k in loaders}
        cpu_rates: dict[str, list[float]] = {k: [] for k in loaders}
        firsts: dict[str, list[float]] = {k: [] for k in loaders}
        for r in range(rounds):
            for name, make in loaders.items():
                torch.manual_seed(r)
                rate, cpu_rate, first = _epoch_rate(make, r)
                rates[name].append(rate)
                cpu_rates[name].append(cpu_rate)
                firsts[name].append(first)
                print(f"  round {r + 1}: {name:<44} {rate:8.1f} img/s {cpu_rate:8.1f} img per CPU-s", flush=True)
        ray_row, notes = None, []
        if not args.no_ray:
            ray_row = _ray_data_rate(cfg, work, batch, crop, scale, workers, rounds)
    TV, BEFORE, FUSED, OURS = list(loaders)
    per_round = lambda v, base: median([a / b for a, b in zip(v, base)])  # a round's loaders run back to back
    vs_tv = {k: per_round(v, rates[TV]) for k, v in rates.items()}
    cpu_vs_tv = {k: per_round(v, cpu_rates[TV]) for k, v in cpu_rates.items()}
    columns = ["loader", "img/s (median)", "img/s (best)", "img per CPU-s", "first batch s", "vs torchvision (img/s)",
               "vs torchvision (per CPU-s)"]
    rows = [[k, round(median(v), 1), round(max(v), 1), round(median(cpu_rates[k]), 1), round(median(firsts[k]), 2),
             round(vs_tv[k], 2), round(cpu_vs_tv[k], 2)] for k, v in rates.items()]
    if ray_row:
        rows.append(["Ray Data: read_parquet + map_batches", round(ray_row["median"], 1), round(ray_row["best"], 1), "-",
                     round(ray_row["first"], 2), round(ray_row["median"] / median(rates[TV]), 2), "-"])
        notes.append(f"Ray Data: a local Ray with {ray_row['cpus']} CPUs started in {ray_row['start_s']:.1f}s (not "
                     "counted); each epoch is a fresh pass over the dataset (map_batches tasks); its ratio compares "
                     "medians (not interleaved), and its CPU time (Ray's worker processes) is not counted.")
    goals = [goal("loader: ours / torchvision VOCSegmentation (images per CPU-second)", cpu_vs_tv[OURS], 1.5),
             goal("loader: ours / torchvision VOCSegmentation (img/s, wall clock)", vs_tv[OURS], 1.5),
             goal("loader: ours before this change / torchvision (images per CPU-second)", cpu_vs_tv[BEFORE], None),
             goal("loader: fused augmentation / step-by-step v2, both float out (per CPU-s)",
                  per_round(cpu_rates[FUSED], cpu_rates[BEFORE]), None),
             goal("loader: uint8 / float hand-over, both fused (per CPU-s)", per_round(cpu_rates[OURS], cpu_rates[FUSED]), None),
             goal("loader: after / before this benchmark's changes (per CPU-s)", per_round(cpu_rates[OURS], cpu_rates[BEFORE]),
                  None)]
    notes.append("Ratios are medians of each round's ratio (the loaders of a round run back to back). 'img per "
                 "CPU-s' divides by the CPU time of this process and its DataLoader workers: what the loader costs, "
                 "whatever else the machine runs; wall-clock img/s on a loaded 2-vCPU machine moves several-fold "
                 "from one round to the next.")
    notes.append("Same 500x375 JPEGs / PNG masks, same augmentation (scale 0.5-2, flip, pad, crop), "
                 f"batch {batch}, {workers} DataLoader worker(s); an epoch = building the loader + one pass. 'float out' "
                 "loaders hand over normalised float32 images and int64 masks; 'uint8 out' hands over uint8 images and "
                 "masks, which pipeline.training.engine normalises and widens on the device (the GPU in a real run).")
    settings = {"images": n, "workers": workers, "batch_size": batch, "crop": crop, "rounds": rounds,
                "scale": list(scale), "image_size": [375, 500]}
    return report("loader", out, columns, rows, goals, settings, notes,
                  extra={"rates": rates, "cpu_rates": cpu_rates, "ray_data": ray_row})


def _ray_data_rate(cfg: dict, work: Path, batch: int, crop: int, scale, workers: int, rounds: int) -> dict:
    from pipeline.data.loaders import list_shards

    cpus = max(2, workers)
    t0 = time.perf_counter()
    ray, owned = start_local_ray(cpus, work / "ray")
    start_s = time.perf_counter() - t0
    try:
        import logging

        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ds = ray.data.read_parquet(list_shards(cfg["data_dir"], "train")).map_batches(AugmentBatch(crop, *scale), batch_size=batch)
        ray_cpus = ray.cluster_resources().get("CPU", cpus)
        rates, firsts = [], []
        for r in range(rounds + 1 if rounds > 1 else 1):  # a first pass warms Ray Data up (workers, imports)
            t0 = time.perf_counter()
            n, first = 0, None
            for b in ds.iter_torch_batches(batch_size=batch, drop_last=True):
                if first is None:
                    first = time.perf_counter() - t0
                n += b["image"].shape[0]
            rate = n / (time.perf_counter() - t0)
            if r or rounds == 1:
                rates.append(rate)
                firsts.append(first or 0.0)
                print(f"  round {max(r, 1)}: {'Ray Data: read_parquet + map_batches':<44} {rate:8.1f} img/s", flush=True)
    finally:
        if owned:
            ray.shutdown()
    return {"median": median(rates), "best": max(rates), "first": median(firsts), "rates": rates,
            "cpus": int(ray_cpus), "start_s": start_s}


# --------------------------------------------------------------------------------- preprocess

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
            params.write_text(yaml.safe_dump({"data": {"source": str(root), "dir": str(data), "workers": workers}}))
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


# --------------------------------------------------------------------------------- model

def _tv_model(name: str):
    from torchvision.models import segmentation as tvs

    return getattr(tvs, name)(weights=None, weights_backbone=None, num_classes=21)


def _time_step(model, x, y, train: bool, sync, clock) -> float:
    import torch
    import torch.nn.functional as F

    t0 = clock()
    if train:
        out = model(x)["out"]
        loss = F.cross_entropy(out.float(), y, ignore_index=255)
        loss.backward()
    else:
        with torch.no_grad():
            model(x)
    sync()
    return clock() - t0


def bench_model(args, out: Path) -> dict:
    names = args.models.split(",") if args.models else (["lraspp_mobilenet_v3_large"] if args.quick else list(TV_IDENTICAL))
    bad = [n for n in names if n not in TV_IDENTICAL]
    if bad:
        raise UserError(f"{', '.join(bad)}: not a model torchvision has an identical copy of; choose from "
                        f"{', '.join(TV_IDENTICAL)} (--models)")
    import torch

    from seg_models import build_model
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device here (--device)")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    batch = args.batch_size or 2
    size = args.crop or (64 if args.quick else 96)
    repeats = args.repeats or (1 if args.quick else 4)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    if device.type == "cuda":
        sync, clock, clock_name = torch.cuda.synchronize, time.perf_counter, "wall ms (CUDA synchronised)"
    else:  # single-threaded and on this process's CPU time: other work on a shared machine barely moves it
        sync, clock, clock_name = (lambda: None), time.process_time, "CPU ms of this process"
    compile_modes = [False, True] if args.compile else [False]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows, results, ratios = [], [], []
    torch.manual_seed(0)
    x0 = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 21, (batch, size, size), device=device)
    print(f"{device}, {threads} thread(s), batch {batch} x {size}x{size}, {repeats} alternating round(s), {clock_name}",
          flush=True)
    try:
        for name in names:
            tv = _tv_model(name).to(device)
            ours = build_model(name, num_classes=21).to(device)
            ours.load_state_dict(tv.state_dict(), strict=True)
            for compiled in compile_modes:
                for cl in (False, True):
                    fmt_ = torch.channels_last if cl else torch.contiguous_format
                    x = x0.contiguous(memory_format=fmt_)
                    pair, compile_s = {}, {}
                    for label, m in (("torchvision", tv), ("ours", ours)):
                        m = m.to(memory_format=fmt_)
                        if compiled:
                            t0 = time.perf_counter()
                            m = torch.compile(m)
                            for mode in (True, False):
                                m.train(mode)
                                _time_step(m, x, y, mode, sync, clock)
                            compile_s[label] = round(time.perf_counter() - t0, 1)
                        pair[label] = m
                    for mode in ("train", "infer"):
                        train = mode == "train"
                        for m in pair.values():  # warm-up
                            m.train(train)
                            _time_step(m, x, y, train, sync, clock)
                        times = {lab: [] for lab in pair}
                        for r in range(repeats):  # A B, B A, ...: neither always goes first
                            for lab in (("torchvision", "ours") if r % 2 == 0 else ("ours", "torchvision")):
                                times[lab].append(_time_step(pair[lab], x, y, train, sync, clock) * 1e3)
                            ours.zero_grad(set_to_none=True)
                            tv.zero_grad(set_to_none=True)
                        ratio = median([o / t for o, t in zip(times["ours"], times["torchvision"])])
                        ratios.append(ratio)
                        t_tv, t_ours = median(times["torchvision"]), median(times["ours"])
                        label = "fwd+bwd" if train else "inference"
                        rows.append([name, label, "on" if cl else "off", "on" if compiled else "off",
                                     round(t_tv, 1), round(t_ours, 1), round(ratio, 3)])
                        results.append({"model": name, "mode": mode, "channels_last": cl, "compile": compiled,
                                         "torchvision_ms": [round(v, 2) for v in times["torchvision"]],
                                         "ours_ms": [round(v, 2) for v in times["ours"]], "compile_s": compile_s})
                        print(f"  {name:<30} {label:<9} cl={'on ' if cl else 'off'} compile={'on ' if compiled else 'off'} "
                              f"torchvision {t_tv:8.1f} ms  ours {t_ours:8.1f} ms  ratio {ratio:.3f}", flush=True)
            del tv, ours
    finally:
        torch.set_num_threads(old_threads)
    columns = ["model", "pass", "channels_last", "compile", "torchvision ms", "ours ms", "ours / torchvision"]
    goals = [goal("model: median ours / torchvision (ms per batch)", median(ratios), 1.05, False),
             goal("model: worst ours / torchvision (ms per batch)", max(ratios), 1.05, False)]
    notes = [f"{device.type}, {threads} thread(s), batch {batch} at {size}x{size}, fp32, {clock_name}; ours loads "
             "torchvision's state_dict (strict), so both run the same weights; the two models alternate step by step, "
             f"in turn going first ({repeats} timed rounds after a warm-up); ms = median round, ratio = median of the "
             "rounds' ratios.",
             "fwd+bwd = forward, cross-entropy on 'out', backward (no optimizer step)."]
    if not args.compile:
        notes.append("torch.compile not timed here (compiling each model takes minutes on this CPU): "
                     "`segpipe bench model --compile` adds it; `segpipe bench gpu --compile` times it on a GPU.")
    settings = {"device": device.type, "threads": threads, "batch_size": batch, "size": size, "repeats": repeats,
                "models": names, "compile": args.compile, "clock": clock_name}
    return report("model", out, columns, rows, goals, settings, notes, extra={"results": results})


# --------------------------------------------------------------------------------- ray

def _epoch_log(path: str):
    """A Ray Train UserCallback (runs in the controller) appending each report to a JSONL file."""
    from ray.train import UserCallback

    class EpochLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = {k: v for k, v in metrics[0].items() if not k.startswith("val/confusion")}
            with open(path, "a") as f:
                f.write(json.dumps({"t": time.time(), **m}) + "\n")

    return EpochLog()


def _plain_loop(cfg: dict, threads: int) -> dict:
    """The same work as train_loop_per_worker with 1 worker, without Ray: one process, no DDP."""
    import torch

    from pipeline.training import engine
    from pipeline.stages.train import _seed_everything, build_loaders
    from pipeline.data.voc import NUM_CLASSES
    from seg_models import build_model

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        _seed_everything(cfg["seed"])
        device = torch.device("cpu")
        model = build_model(cfg["model"], num_classes=NUM_CLASSES, **cfg["options"])
        engine.set_bn_momentum(model, cfg["bn_momentum"])
        if cfg["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        opts = engine.StepOptions(device=device, amp_dtype=None, aux_weight=cfg["aux_weight"], channels_last=cfg["channels_last"])
        loader, _ = build_loaders(cfg, 0, 1, 0)
        optimizer = engine.make_optimizer(model, cfg["lr"], cfg["momentum"], cfg["weight_decay"])
        scheduler = engine.poly_schedule(optimizer, cfg["epochs"] * len(loader))
        rates, steps = [], []
        for epoch in range(cfg["epochs"]):
            loader, _ = build_loaders(cfg, 0, 1, epoch)
            s = engine.train_epoch(model, loader, optimizer, scheduler, None, opts, epoch + 1)
            rates.append(s["img_per_s"])
            steps.append(s["steps"])
        return {"img_per_s": rates, "steps": steps, "wall_s": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(old)


def bench_ray(args, out: Path) -> dict:
    from pipeline.config import DataParams, Params, RayParams, SyntheticParams, TrainParams
    from pipeline.data.sources import fetch
    from pipeline.data.shards import preprocess
    from pipeline.stages.train import Job, fit, worker_config

    n = args.images or (16 if args.quick else 64)
    epochs = args.epochs or (2 if args.quick else 4)
    batch = args.batch_size or (4 if args.quick else 8)
    crop = args.crop or (64 if args.quick else 96)
    threads = args.threads or 1
    model = (args.models or "lraspp_mobilenet_v3_large").split(",")[0]
    try:
        worker_counts = sorted({int(x) for x in args.ray_workers.split(",")})
    except ValueError:
        worker_counts = []
    if not worker_counts or worker_counts[0] < 1:
        raise UserError(f"--ray-workers takes worker counts like 1,2, got {args.ray_workers!r} (--ray-workers)")
    cores = os.cpu_count() or 1
    rows, goals, notes, runs = [], [], [], {}
    with Scratch(args.workdir, "ray") as work:
        data = work / "data"
        base = Params(data=DataParams(source="synthetic", dir=str(data),
                                      synthetic=SyntheticParams(train_count=n, val_count=max(2, batch), size=crop)),
                      train=TrainParams(epochs=epochs, batch_size=batch, crop_size=crop, eval_size=crop, scale_min=0.75,
                                        scale_max=1.25, loader_workers=0, eval_every=epochs, bn_momentum=0.1,
                                        sample_images=0))
        fetch(base, progress=False)
        preprocess(base, progress=False)
        ray_cpus = [float(max(2, cores))]

        def job_for(workers: int) -> Job:
            p = base.model_copy(deep=True)
            # each worker asks Ray for `threads` CPUs (less when joining a smaller Ray, e.g. a test's)
            request = min(float(threads), max(0.1, (ray_cpus[0] - 1) / workers))
            p.ray = RayParams(num_workers=workers, cpus_per_worker=request, use_gpu=False,
                              storage_path=str(work / "ray_results"))
            return Job(family="bench", model=model, options={}, params=p, tracking_uri="",
                       storage_path=str(work / "ray_results"), ray_name=f"bench-{workers}w-{time.time_ns()}",
                       extra_config={"threads": threads})

        print(f"{model}, {n} images at {crop}px, batch {batch}/worker, {epochs} epochs, {threads} torch thread(s) per "
              f"process, {cores} cores", flush=True)
        cfg = worker_config(job_for(1))
        runs["plain"] = [_plain_loop(cfg, threads)]
        print(f"  plain loop: {[round(v, 1) for v in runs['plain'][0]['img_per_s']]} img/s per epoch", flush=True)
        t0 = time.perf_counter()
        ray, owned = start_local_ray(max(2, cores) + 1, work / "rt")  # +1: room for Ray Train's controller
        ray_start = time.perf_counter() - t0
        ray_cpus[0] = ray.cluster_resources().get("CPU", cores)
        try:
            for workers in worker_counts:
                log = work / f"epochs-{workers}.jsonl"
                t0 = time.perf_counter()
                fit(job_for(workers), callbacks=[_epoch_log(str(log))])
                wall = time.perf_counter() - t0
                recs = [json.loads(line) for line in log.read_text().splitlines()]
                runs[f"ray{workers}"] = {"img_per_s": [r["train/img_per_s"] for r in recs], "wall_s": wall}
                print(f"  Ray Train, {workers} worker(s): {[round(r['train/img_per_s'], 1) for r in recs]} img/s per epoch",
                      flush=True)
        finally:
            if owned:
                ray.shutdown()
        runs["plain"].append(_plain_loop(cfg, threads))  # again after: the baseline brackets the Ray runs
        print(f"  plain loop: {[round(v, 1) for v in runs['plain'][1]['img_per_s']]} img/s per epoch", flush=True)
    steady = lambda xs: xs[1:] if len(xs) > 1 else xs  # the first epoch warms up
    plain_rates = [v for r in runs["plain"] for v in steady(r["img_per_s"])]
    base_rate = median(plain_rates)
    columns = ["loop", "processes x threads", "img/s (median epoch)", "steps/s per process", "wall s (run)", "vs plain"]
    rows.append(["plain torch loop (pipeline.training.engine)", f"1 x {threads}", round(base_rate, 1), round(base_rate / batch, 2),
                 round(median([r["wall_s"] for r in runs["plain"]]), 1), 1.0])
    rate = {}
    for workers in worker_counts:
        r = runs[f"ray{workers}"]
        rate[workers] = median(steady(r["img_per_s"]))
        rows.append([f"Ray Train TorchTrainer, {workers} worker{'s' * (workers > 1)}", f"{workers} x {threads}",
                     round(rate[workers], 1), round(rate[workers] / batch / workers, 2), round(r["wall_s"], 1),
                     round(rate[workers] / base_rate, 3)])
    first = worker_counts[0]
    goals.append(goal(f"ray: Ray Train ({first} worker{'s' * (first > 1)}) per-step overhead vs the plain loop "
                      f"(1 - img/s ratio{'' if first == 1 else ' per worker'})", 1 - rate[first] / first / base_rate,
                      0.10, False))
    if 1 in rate and 2 in rate:
        goals.append(goal("ray: 2 workers / 1 worker (img/s)", rate[2] / rate[1], None))
    notes.append(f"Same shards ({n} synthetic images), model ({model}, fp32, channels_last), batch, loaders "
                 "(pipeline.train.build_loaders, 0 DataLoader workers) and step (pipeline.engine.train_epoch, which "
                 "measures img/s) in both loops; epochs after the first; the plain loop ran before and after the Ray "
                 "runs and its median is the baseline.")
    notes.append(f"{threads} torch thread(s) per process: on a small shared machine a 2-thread process stalls "
                 "whenever another process holds one core, which swamps what is measured here.")
    notes.append(f"wall s = the whole run: for Ray, starting the worker group, a checkpoint per epoch and a final "
                 f"evaluation (the plain loop does neither); the local Ray itself started in {ray_start:.1f}s before.")
    settings = {"model": model, "images": n, "epochs": epochs, "batch_size": batch, "crop": crop, "cores": cores,
                "threads": threads}
    return report("ray", out, columns, rows, goals, settings, notes, extra={"runs": runs, "ray_start_s": ray_start})


# --------------------------------------------------------------------------------- pipeline

def _git_files(root: Path) -> list[str]:
    res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"{root} is not a git checkout: `segpipe bench pipeline` copies its files (git ls-files)")
    return [f for f in res.stdout.split("\0") if f and (root / f).is_file()]


def _timed_lines(cmd: list[str], cwd: Path, env: dict) -> tuple[int, list[tuple[float, str]], float]:
    """Run cmd, stdout+stderr merged and echoed; returns (exit code, [(seconds since start, line)], total s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        print(f"  | {lines[-1][1]}", flush=True)
    rc = proc.wait()
    return rc, lines, time.perf_counter() - t0


def stage_durations(lines: list[tuple[float, str]], total: float) -> dict[str, float]:
    """From DVC's log: each "Running stage 'X':" lasts until the next stage line (or the end)."""
    import re

    marks = [(t, m.group(1)) for t, line in lines if (m := re.search(r"Running stage '([^']+)'", line))]
    ends = [t for t, line in lines if re.search(r"Running stage '|Stage '[^']+' didn't change|Ran experiment", line)]
    out = {}
    for t, name in marks:
        later = [e for e in ends if e > t]
        out[name] = (later[0] if later else total) - t
    return out


def bench_pipeline(args, out: Path) -> dict:
    import shutil

    from pipeline.config import load_params
    from pipeline.stages.quickstart import profile_overrides

    bindir = Path(sys.executable).parent
    dvc = str(bindir / "dvc") if (bindir / "dvc").exists() else "dvc"
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT),
               RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    overrides = profile_overrides("quickstart")
    if not args.full:
        overrides.append(f"train.epochs={args.epochs or 2}")
    overrides += list(args.overrides)
    targets = args.stages.split(",") if args.stages else []
    notes = []
    with Scratch(args.workdir, "pipeline") as work:
        repo = work / "repo"
        if repo.exists():
            shutil.rmtree(repo)
        for rel in _git_files(ROOT):
            if rel.startswith(("reports/", "data/")):
                continue
            dst = repo / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst)
        load_params(repo / "params.yaml", overrides)  # a bad -S fails here, before DVC runs anything
        run = lambda cmd: subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        git = ["git", "-c", "user.name=segpipe-bench", "-c", "user.email=bench@localhost"]
        for cmd in (["git", "init", "-q"], *([[dvc, "init", "-q"]] if not (repo / ".dvc").is_dir() else []),
                    [dvc, "config", "core.analytics", "false"], [*git, "add", "-A"], [*git, "commit", "-qm", "bench"]):
            res = run(cmd)
            if res.returncode != 0:
                raise UserError(f"`{' '.join(cmd[-3:])}` failed in the scratch repo: {res.stderr.strip()[-300:]}")
        listed = run([dvc, "stage", "list", "--name-only"])
        stages = listed.stdout.split()
        missing = [t for t in targets if not any(s == t or s.startswith(t + "@") for s in stages)]
        if missing:
            raise UserError(f"no stage {', '.join(missing)} in dvc.yaml (has {', '.join(stages)}) (--stages)")
        from pipeline.stages import quickstart

        set_params = getattr(quickstart, "dvc_set_params", lambda os_: [x for o in os_ for x in ("-S", o)])
        cmd = [dvc, "exp", "run", *set_params(overrides), *targets]  # what `segpipe quickstart` runs
        print(f"scratch repo {repo}\n$ dvc exp run -S <quickstart profile{'' if args.full else ', train.epochs=' + str(args.epochs or 2)}>"
              + (" " + " ".join(targets) if targets else ""), flush=True)
        rc, lines, total = _timed_lines(cmd, repo, env)
        if rc != 0:
            raise UserError("`dvc exp run` failed in the scratch repo:\n" + "\n".join(l for _, l in lines[-30:]))
        stage_times = stage_durations(lines, total)
        for name, secs in stage_times.items():
            print(f"  {name:<24} {secs:7.1f} s", flush=True)
        t0 = time.perf_counter()
        noop = run([dvc, "repro", *targets])
        noop_s = time.perf_counter() - t0
        if noop.returncode != 0 or "Running stage" in noop.stdout:
            raise UserError(f"the second `dvc repro` was not a no-op: {(noop.stdout + noop.stderr).strip()[-600:]}")
        print(f"  no-op dvc repro          {noop_s:7.1f} s", flush=True)
    rows = [[f"stage {name}", round(secs, 1), round(secs / total, 3)] for name, secs in stage_times.items()]
    rows.append(["dvc exp run, all of it", round(total, 1), 1.0])
    rows.append(["no-op dvc repro (nothing changed)", round(noop_s, 1), round(noop_s / total, 3)])
    columns = ["step", "seconds", "share"]
    goals = [goal("pipeline: no-op `dvc repro` seconds", noop_s, 10.0, False)]
    variant = ("the quickstart profile" if args.full
               else f"the quickstart profile with train.epochs={args.epochs or 2} (the real one: --full)")
    notes.append(f"`dvc exp run -S ...` with {variant}, as `segpipe quickstart` runs it, in a scratch git + DVC copy "
                 "of the checkout; a stage's time runs from DVC's 'Running stage' line to the next one, so DVC's own "
                 "hashing and lock writing are included; every `segpipe train` starts its own local Ray.")
    if targets:
        notes.append(f"only the stages {', '.join(targets)} (and what they depend on).")
    settings = {"overrides": overrides, "targets": targets, "full": args.full}
    return report("pipeline", out, columns, rows, goals, settings, notes,
                  extra={"stage_seconds": stage_times, "total_seconds": total, "noop_seconds": noop_s,
                         "log_tail": [l for _, l in lines[-40:]]})


# --------------------------------------------------------------------------------- gpu

def load_gpu_bench():
    import importlib.util

    path = ROOT / "benchmarks" / "gpu_bench.py"
    if not path.is_file():
        raise UserError(f"{path} is missing (a checkout of the repo has it)")
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_gpu(args, out: Path) -> dict:
    mod = load_gpu_bench()
    argv = ["--out", str(out)]
    if args.quick:
        argv.append("--quick")
    if args.compile:
        argv.append("--compile")
    if args.models:
        argv += ["--models", args.models]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    if args.crop:
        argv += ["--crop", str(args.crop)]
    if args.device == "cpu":
        argv += ["--device", "cpu"]
    if args.name:
        argv += ["--name", args.name]
    try:
        payload = mod.main(argv + ["--no-md"])
    except SystemExit as exc:  # the script's own `error: ...` exits
        msg = str(exc.code or "")
        raise UserError(msg.removeprefix("error: ") + " (segpipe bench gpu)") from None
    write_markdown(out)
    print(f"wrote {out.parent / 'bench.md'}")
    return payload


# --------------------------------------------------------------------------------- entry

def bench_verify(args, out: Path) -> dict:
    """The cost of train/tune's shard check (pipeline.data.verify_shards: size, rows, sha256 of
    every shard) against one loader-only pass over the same shards (decode + train transform at
    --crop, one process: a lower bound on a training epoch), and its throughput in GB/s."""
    import shutil

    from pipeline.data.loaders import ShardDataset, verify_shards; from pipeline.data.transforms import train_transform

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


BENCHES = {"loader": bench_loader, "preprocess": bench_preprocess, "model": bench_model, "ray": bench_ray,
           "pipeline": bench_pipeline, "gpu": bench_gpu, "verify": bench_verify}


def run(_params, args) -> int:
    out = Path(args.out)
    for name in ("images", "workers", "batch_size", "crop", "repeats", "epochs", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < (0 if name == "workers" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'workers' else 'positive'}, got {v}")
    if args.overrides and args.what != "pipeline":
        raise UserError("-S only applies to `segpipe bench pipeline` (the stages' params) (-S)")
    if args.what == "md":
        path = write_markdown(out)
        print(f"wrote {path} from {out}/*.json")
        return 0
    if args.name is not None and (not args.name or not all(c.isalnum() or c in "-_" for c in args.name)):
        raise UserError(f"--name takes letters, digits, '-' and '_', got {args.name!r} (--name)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    RESULT_NAME["name"] = args.name or ""
    try:
        BENCHES[args.what](args, out)
    finally:
        RESULT_NAME.clear()
    return 0
