"""`segpipe bench loader`: the loader `segpipe train` builds vs torchvision VOCSegmentation (and the
step-by-step transform before it, and Ray Data over the same shards)."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import Scratch, goal, median, report
from benchmarks.data import make_shards, make_voc, start_local_ray
from pipeline.config import default_params
from pipeline.training.setup import build_loaders
from pipeline.training.spec import WorkerSpec


class ReferenceTrainTransform:
    """The train augmentation as separate torchvision.transforms.v2 steps -- what one writes with
    torchvision: resize the whole image by a random factor, flip, pad, crop, ToDtype + Normalize.
    Same distribution as pipeline.data.transforms.train_transform (which fuses them, see RandomScaleCrop);
    the loaders' baseline, and pipeline.data.loaders's train transform before `segpipe bench loader`."""

    def __init__(self, crop: int, scale_min: float = 0.5, scale_max: float = 2.0):
        import torch
        from torchvision.transforms import v2

        from pipeline.data import transforms as D
        from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        self.lo, self.hi = scale_min, scale_max
        self.flip, self.pad, self.crop = v2.RandomHorizontalFlip(), D.PadTo(crop), v2.RandomCrop(crop)
        self.to_float = v2.ToDtype(torch.float32, scale=True)
        self.norm = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

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


def ray_dataset(data_dir: str | Path, split: str):
    """A Ray Data dataset over one split's shards (rows: id, image bytes, mask bytes, ...): the Ray Data
    path this benchmark compares with (segpipe train reads the shards with its own loader)."""
    import ray.data

    from pipeline.data.loaders import list_shards

    return ray.data.read_parquet([str(p) for p in list_shards(data_dir, split)])


class AugmentBatch:
    """Ray Data map_batches: JPEG/PNG bytes -> the train augmentation -> stacked arrays."""

    def __init__(self, crop: int, scale_min: float, scale_max: float):
        self.crop, self.scale_min, self.scale_max = crop, scale_min, scale_max

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        from torchvision import tv_tensors

        from pipeline.data.loaders import decode_image, decode_mask
        from pipeline.data.transforms import train_transform

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

    from pipeline.data.loaders import BlockShuffleSampler, ShardDataset
    from pipeline.data.transforms import train_transform

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
        # the spec `segpipe train` hands its workers (params.yaml's train block), at this benchmark's sizes
        cfg = WorkerSpec.from_params(default_params(), model="", options={}, data_dir=str(work / "data")).replace(
            crop_size=crop, eval_size=crop, scale_min=scale[0], scale_max=scale[1], seed=0, batch_size=batch,
            loader_workers=workers)
        tv_ds = VOCSegmentation(str(work / "voc"), year="2012", image_set="train",
                                transforms=PILPair(reference_train_transform(crop, *scale)))
        tv_loader = DataLoader(tv_ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, pin_memory=pin)

        def before(epoch):
            ds = ShardDataset(cfg.data_dir, "train", reference_train_transform(crop, *scale))
            sampler = BlockShuffleSampler(ds, seed=0)
            sampler.set_epoch(epoch)
            return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True, pin_memory=pin)

        def fused_float(epoch):
            ds = ShardDataset(cfg.data_dir, "train", train_transform(crop, *scale))
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


def _ray_data_rate(cfg, work: Path, batch: int, crop: int, scale, workers: int, rounds: int) -> dict:
    cpus = max(2, workers)
    t0 = time.perf_counter()
    ray, owned = start_local_ray(cpus, work / "ray")
    start_s = time.perf_counter() - t0
    try:
        import logging

        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ds = ray_dataset(cfg.data_dir, "train").map_batches(AugmentBatch(crop, *scale), batch_size=batch)
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
