"""`segpipe bench ray`: the Ray Train loop vs a plain single-process loop, both built by
pipeline.training.setup, on the same data and model; 1 vs 2 workers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import Scratch, goal, median, report
from benchmarks.data import start_local_ray
from pipeline.errors import UserError
from pipeline.training import engine
from pipeline.training.setup import build, build_loaders


def _epoch_log(path: str):
    """A Ray Train UserCallback (runs in the controller) appending each report to a JSONL file."""
    from ray.train import UserCallback

    class EpochLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = {k: v for k, v in metrics[0].items() if not k.startswith("val/confusion")}
            with open(path, "a") as f:
                f.write(json.dumps({"t": time.time(), **m}) + "\n")

    return EpochLog()


def _plain_loop(spec, threads: int) -> dict:
    """The same work as train_loop_per_worker with 1 worker (pipeline.training.setup.build), without Ray:
    one process, no DDP."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        loader, _ = build_loaders(spec, 0, 1, 0)
        s = build(spec, torch.device("cpu"), len(loader))  # the worker's set-up, without DDP
        rates, steps = [], []
        for epoch in range(spec.epochs):
            loader, _ = build_loaders(spec, 0, 1, epoch)
            stats = engine.train_epoch(s.model, loader, s.optimizer, s.scheduler, s.scaler, s.opts, epoch + 1)
            rates.append(stats["img_per_s"])
            steps.append(stats["steps"])
        return {"img_per_s": rates, "steps": steps, "wall_s": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(old)


def bench_ray(args, out: Path) -> dict:
    from pipeline.config import DataParams, Params, RayParams, SyntheticParams, TrainParams
    from pipeline.data.sources import fetch
    from pipeline.data.shards import preprocess
    from pipeline.training.job import Job, fit
    from pipeline.training.spec import WorkerSpec

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
            spec = WorkerSpec.from_params(p, model=model, options={}, data_dir=str(data)).replace(threads=threads)
            return Job(family="bench", model=model, options={}, params=p, tracking_uri="", spec=spec,
                       storage_path=str(work / "ray_results"), ray_name=f"bench-{workers}w-{time.time_ns()}")

        print(f"{model}, {n} images at {crop}px, batch {batch}/worker, {epochs} epochs, {threads} torch thread(s) per "
              f"process, {cores} cores", flush=True)
        runs["plain"] = [_plain_loop(job_for(1).spec, threads)]
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
        runs["plain"].append(_plain_loop(job_for(1).spec, threads))  # again after: the baseline brackets the Ray runs
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
                 "(pipeline.training.setup: build_loaders with 0 DataLoader workers, build) and step (pipeline.training.engine.train_epoch, which "
                 "measures img/s) in both loops; epochs after the first; the plain loop ran before and after the Ray "
                 "runs and its median is the baseline.")
    notes.append(f"{threads} torch thread(s) per process: on a small shared machine a 2-thread process stalls "
                 "whenever another process holds one core, which swamps what is measured here.")
    notes.append(f"wall s = the whole run: for Ray, starting the worker group, a checkpoint per epoch and a final "
                 f"evaluation (the plain loop does neither); the local Ray itself started in {ray_start:.1f}s before.")
    settings = {"model": model, "images": n, "epochs": epochs, "batch_size": batch, "crop": crop, "cores": cores,
                "threads": threads}
    return report("ray", out, columns, rows, goals, settings, notes, extra={"runs": runs, "ray_start_s": ray_start})
