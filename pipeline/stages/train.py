"""Train one family with Ray Train (DDP), tracked in MLflow.

Trains families.<--family> (or train.model) on <data.dir>/shards with ray.num_workers Ray Train
workers (gloo on CPU, NCCL on GPUs); starts a local Ray unless ray.address / RAY_ADDRESS names a
cluster. Evaluates every train.eval_every epochs (confusion matrix all-reduced over workers),
checkpoints every epoch under ray.storage_path (train.resume continues the latest run), logs params,
per-epoch metrics, per-class IoU, confusion matrix, prediction grid and the model to MLflow, and
writes <models_dir>/<family>-seed<N>.pt and <reports_dir>/metrics/<family>-seed<N>.json (--seed N
overrides `seed`; DVC's train matrix runs every family x seeds). --all trains every family x seed at
once on the Ray cluster, each its own TorchTrainer packed by Ray's resources, with the same runs and
outputs (progress lines prefixed family/seedN; a failed run is named, the others finish).
"""

# How it works (developer notes):
# The driver validates everything first (bad params never start Ray), creates the MLflow run and
# hands its id to Ray. Each worker reads a disjoint part of the shards and runs the training step of
# pipeline.training.engine; the confusion matrix is all-reduced before any metric is computed. Rank 0
# checkpoints every epoch (model, optimizer, scheduler, scaler, epoch) through Ray Train; a
# controller callback logs each reported epoch to MLflow and prints one progress line, so the
# metric history follows the checkpoints (a restarted worker group never logs an epoch twice).
# At the end the driver logs the confusion matrix, a prediction grid and the model, and writes the
# DVC outputs: <models_dir>/<family>-seed<N>.pt, <reports_dir>/metrics/<family>-seed<N>.json and
# <family>-seed<N>_epochs.csv.

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import storage
from pipeline.config import Params, family_params
from pipeline.errors import UserError
from pipeline.data.voc import NUM_CLASSES, VOC_CLASSES
from pipeline.storage import REPO


class TrainingFailed(UserError):
    """The run started but failed (e.g. NaN loss): `error: ...`, exit 1."""

    exit_code = 1


@dataclass
class Job:
    """Everything a training run needs, resolved and validated on the driver."""

    family: str
    model: str
    options: dict
    params: Params
    tracking_uri: str
    run_id: str = ""
    storage_path: str = ""
    ray_name: str = ""
    extra_config: dict = field(default_factory=dict)
    label: str = ""  # progress-line prefix (train --all: <family>/seed<N>); default the family


def add_arguments(parser) -> None:
    parser.add_argument("--family", help="a key of `families` in params.yaml (fcn, deeplabv3, lraspp, unet); "
                                         "without it train.model / train.model_options are trained")
    parser.add_argument("--seed", type=int, default=None,
                        help="overrides `seed` for this run (DVC's train matrix passes each of `seeds`); "
                             "outputs are named <family>-seed<N>")
    parser.add_argument("--all", action="store_true",
                        help="train every family x seed of params.yaml concurrently on the Ray cluster "
                             "(ray.address / RAY_ADDRESS, else a local Ray), each its own TorchTrainer, "
                             "packed by ray.num_workers x ray.cpus_per_worker (+ GPU); same outputs as one by one")


def family_of(model: str) -> str:
    from seg_models import model_info

    return model_info(model)["family"]


def resolve_job(p: Params, family: str | None) -> Job:
    """Pick the model for `family` (or train.model) and check it builds with its options."""
    from pipeline.tracking import resolve_tracking_uri

    if family:
        if family not in p.families:
            raise UserError(f"unknown family {family!r}: params.yaml families has {sorted(p.families)} (--family)")
        p = family_params(p, family)  # families.<family>.train over the shared train block
        model, options = p.families[family].model, dict(p.families[family].options)
        options.update(p.train.model_options)
    else:
        model, options = p.train.model, dict(p.train.model_options)
    check_model(model, options, where=f"families.{family}.model" if family else "train.model")
    fam = family or family_of(model)
    return Job(family=fam, model=model, options=options, params=p, tracking_uri=resolve_tracking_uri(p.mlflow.tracking_uri))


def check_model(model: str, options: dict, where: str = "train.model") -> None:
    """Build on the meta device: instant, and every bad name / option surfaces before Ray starts."""
    import torch

    from seg_models import build_model, list_models

    if model not in list_models():
        raise UserError(f"unknown model {model!r}; `segpipe models` lists {', '.join(list_models())} ({where})")
    try:
        with torch.device("meta"):
            build_model(model, num_classes=NUM_CLASSES, **options)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{model}: {exc} (model options)") from None


def check_data(p: Params) -> dict:
    from pipeline.data.loaders import load_manifest

    manifest = load_manifest(p.data.dir)
    for split in ("train", "val"):
        if manifest["splits"].get(split, {}).get("count", 0) == 0:
            raise UserError(f"no {split} images in {p.data.dir}/shards: re-run `segpipe preprocess` (data.dir)")
    return manifest


def worker_config(job: Job) -> dict:
    p = job.params
    t = p.train
    return {
        "model": job.model, "options": job.options, "seed": p.seed,
        "data_dir": storage.resolve(p.data.dir),
        "epochs": t.epochs, "batch_size": t.batch_size, "crop_size": t.crop_size, "eval_size": t.eval_size,
        "scale_min": t.scale_min, "scale_max": t.scale_max, "lr": t.lr, "momentum": t.momentum,
        "weight_decay": t.weight_decay, "warmup_epochs": t.warmup_epochs, "poly_power": t.poly_power,
        "aux_weight": t.aux_weight, "aux_lr_mult": t.aux_lr_mult, "bn_momentum": t.bn_momentum, "amp": t.amp, "channels_last": t.channels_last, "grad_clip": t.grad_clip,
        "eval_every": t.eval_every, "loader_workers": t.loader_workers,
        "threads": max(1, int(p.ray.cpus_per_worker)),
        **job.extra_config,
    }


# ------------------------------------------------------------------------------ worker side


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loaders(cfg: dict, rank: int, world_size: int, epoch: int):
    import torch
    from torch.utils.data import DataLoader

    from pipeline.data.loaders import BlockShuffleSampler, ShardDataset; from pipeline.data.transforms import eval_transform, train_transform

    # uint8 images and masks: pipeline.training.engine normalises them on the device (`segpipe bench loader`)
    # tune trials: train_split "train-tune", val_split "tune" (pipeline.stages.tune); a training run: train / val
    train_ds = ShardDataset(cfg["data_dir"], cfg.get("train_split", "train"), train_transform(cfg["crop_size"], cfg["scale_min"], cfg["scale_max"],
                                                                       normalize=False),
                            rank=rank, world_size=world_size, pad=True)
    val_ds = ShardDataset(cfg["data_dir"], cfg.get("val_split", "val"), eval_transform(cfg["eval_size"], normalize=False), rank=rank,
                          world_size=world_size)
    sampler = BlockShuffleSampler(train_ds, seed=cfg["seed"] * 100 + rank)
    sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch * 101 + rank)
    workers = cfg["loader_workers"]
    common = {"num_workers": workers, "pin_memory": torch.cuda.is_available(), "persistent_workers": False}
    train = DataLoader(train_ds, batch_size=cfg["batch_size"], sampler=sampler, generator=gen,
                       drop_last=len(train_ds) >= cfg["batch_size"], **common)
    val = DataLoader(val_ds, batch_size=cfg["batch_size"], shuffle=False, **common)
    return train, val


def train_loop_per_worker(cfg: dict) -> None:
    """Runs in every Ray Train worker (also inside each Ray Tune trial)."""
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.training import dist as collective
    from pipeline.training import engine
    from pipeline.training.metrics import scores
    from seg_models import build_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if os.environ.get("SEGPIPE_PID_DIR"):  # lets the tests find us (killed-worker) and our node (two-host)
        Path(os.environ["SEGPIPE_PID_DIR"], f"worker-{rank}-{os.getpid()}").write_text(ray.util.get_node_ip_address())
    torch.set_num_threads(cfg["threads"])
    _seed_everything(cfg["seed"])  # same init weights on every rank
    device = ray.train.torch.get_device()
    model = build_model(cfg["model"], num_classes=NUM_CLASSES, **cfg["options"])
    engine.set_bn_momentum(model, cfg["bn_momentum"])
    if device.type == "cuda":  # at world size 1 too (SyncBatchNorm then reduces nothing): one code path
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    if os.environ.get("SEGPIPE_FAULT_NAN_RANK") == str(rank):  # fault injection (tests): this rank's loss is NaN
        with torch.no_grad():
            next(core.parameters()).fill_(float("nan"))
    opts = engine.StepOptions(device=device, amp_dtype=engine.resolve_amp(cfg["amp"], device),
                              aux_weight=cfg["aux_weight"], grad_clip=cfg["grad_clip"], channels_last=cfg["channels_last"])
    train_loader, _ = build_loaders(cfg, rank, world, 0)
    steps_per_epoch = max(1, len(train_loader))
    optimizer = engine.make_optimizer(model, cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg.get("aux_lr_mult", 1.0))
    scheduler = engine.poly_schedule(optimizer, cfg["epochs"] * steps_per_epoch,
                                     int(cfg["warmup_epochs"] * steps_per_epoch), cfg["poly_power"])
    scaler = torch.amp.GradScaler(device.type, enabled=opts.amp_dtype == torch.float16)
    start_epoch = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            try:
                state = load_state(Path(d) / "state.pt", map_location=device)
            except UserError as exc:  # the driver checked it before Ray started; a swap since then lands here
                raise RuntimeError(f"{WORKER_ERROR}{exc}") from None
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])

    for epoch in range(start_epoch, cfg["epochs"]):
        train_loader, val_loader = build_loaders(cfg, rank, world, epoch)
        try:
            stats = engine.train_epoch(model, train_loader, optimizer, scheduler, scaler, opts, epoch + 1,
                                       any_rank=lambda flag: collective.any_rank(flag, device))
        except engine.NonFiniteLoss as exc:  # every rank stops at this step (the flag is all-reduced)
            if os.environ.get("SEGPIPE_PID_DIR"):
                Path(os.environ["SEGPIPE_PID_DIR"], f"nan-{rank}-{exc.epoch}-{exc.step}").touch()
            raise RuntimeError(f"segpipe: {exc}") from None
        # every collective goes through pipeline.training.dist (on the training device), at every world size
        sums = collective.all_reduce(torch.tensor([stats["loss"] * stats["images"], stats["images"],
                                                   stats["img_per_s"]], dtype=torch.float64), device)
        metrics = {"epoch": epoch + 1, "train/loss": float(sums[0] / max(1.0, float(sums[1]))),
                   "train/lr": stats["lr"], "train/img_per_s": float(sums[2])}
        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
            # the unwrapped module: no DDP buffer sync, so a rank without val batches hangs nobody
            cm = collective.all_reduce(engine.evaluate(core, val_loader, opts, NUM_CLASSES), device)
            metrics.update({f"val/{k}": v for k, v in scores(cm).items()})
            metrics["val/confusion_matrix"] = cm.tolist()
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                            "model_name": cfg["model"], "options": cfg["options"],
                            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
                           Path(tmp) / "state.pt")
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            # inside a Ray Tune trial, TuneReportCallback forwards this report to Tune
            ray.train.report(metrics, checkpoint=checkpoint)


# ------------------------------------------------------------------------------ driver side


def make_epoch_callback(job: Job, progress_queue=None):
    """A Ray Train UserCallback (runs in the controller): logs each reported epoch to MLflow and
    sends one progress line per epoch to the driver through `progress_queue` (a ray Queue;
    None: no progress lines, as in Tune trials, where Tune prints its own table)."""
    from ray.train import UserCallback

    from pipeline.tracking import log_metrics

    uri, run_id, epochs, label = job.tracking_uri, job.run_id, job.params.train.epochs, job.label or job.family

    class EpochLogger(UserCallback):
        def __init__(self):
            self.t0 = time.time()  # the run's start (Ray set-up included), so the first ETA is honest
            self.first_epoch = None

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            epoch = int(m["epoch"])
            if self.first_epoch is None:  # a resumed run starts counting at its first new epoch
                self.first_epoch = epoch - 1
            log_metrics(uri, run_id, {k: v for k, v in m.items() if k.startswith(("train/", "val/"))}, step=epoch)
            done = epoch - self.first_epoch
            eta = (time.time() - self.t0) / max(1, done) * (epochs - epoch)
            val = f"  val mIoU {m['val/mIoU']:.3f}" if "val/mIoU" in m else ""
            if progress_queue is not None:
                progress_queue.put(f"[{label}] epoch {epoch}/{epochs}  loss {m['train/loss']:.4f}  "
                                   f"{m['train/img_per_s']:.1f} img/s{val}  ETA {int(eta) // 60}m{int(eta) % 60:02d}s")

    return EpochLogger()


class ProgressPrinter:
    """Driver side of the progress channel: a thread printing what the controller sends."""

    def __init__(self):
        import threading

        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def _pump(self):
        from ray.util.queue import Empty

        while True:
            try:
                print(self.queue.get(timeout=0.5), flush=True)
            except Empty:
                if self._stop.is_set():
                    return
            except Exception:  # the queue actor is gone (Ray shutting down)
                return

    def __enter__(self):
        self._thread.start()
        return self.queue

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.queue.shutdown()
        except Exception:
            pass


def ray_init(p: Params) -> bool:
    """Ray for this command: ray.address / RAY_ADDRESS, else a local one (system.ray_init)."""
    from pipeline import system

    return system.ray_init(p.ray.address)


def use_gpu(p: Params) -> bool:
    if p.ray.use_gpu == "auto":
        from pipeline import system

        return system.ray_has_gpu()
    return bool(p.ray.use_gpu)


def _ray_run_name(job: Job, storage_path: str) -> str:
    """resume: the latest run of this family/model/seed under storage; else a new timestamped one."""
    prefix = f"{job.family}-{job.model}-seed{job.params.seed}"
    if job.params.train.resume:
        runs = [d for d in storage.list_dirs(storage_path) if d.startswith(prefix + "-")]
        if runs:
            return runs[-1]
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def fit(job: Job, callbacks: list | None = None):
    """Build and run the TorchTrainer for `job` (used by train and by every tune trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training import dist as collective

    p = job.params
    gpu = use_gpu(p)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(job),
        torch_config=collective.torch_config("nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=p.ray.num_workers, use_gpu=gpu, placement_strategy=p.ray.placement_strategy,
                                     resources_per_worker={"CPU": p.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name=job.ray_name, storage_path=job.storage_path,
                             failure_config=FailureConfig(max_failures=p.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks or []),
    )
    return trainer.fit()


# A worker's error the driver turns into one `error:` line (Ray wraps worker exceptions).
WORKER_ERROR = "segpipe-user-error: "


def load_state(path, map_location="cpu", name: str | None = None) -> dict:
    """Read a segpipe checkpoint (a Ray checkpoint's state.pt or a <family>-seed<N>.pt) safely.

    torch.load(weights_only=True): the unpickler builds only tensors, plain containers and
    numbers/strings (plus torch's own allow-list); any other global (a class, a function such as
    os.system named by a crafted __reduce__) is refused before anything runs. The checkpoints
    segpipe writes hold nothing else (model/optimizer/scheduler/scaler state dicts, epoch, model
    name and options, RNG state as a tensor + Python's getstate() tuple), so no extra globals are
    allow-listed. Anything unreadable is a UserError naming the file (`name`, default `path`)."""
    import pickle

    import torch

    name = name or str(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only's unpickler names the global / class / call it refused; other failures
        # (e.g. "Unsupported operand" for a JPEG) mean the file is no pickle at all
        why = next((line.strip() for line in str(exc).splitlines()
                    if any(k in line for k in ("GLOBAL", "global", "reduce", "class", "allowed"))
                    and "documentation" not in line and "weights_only" not in line), None)
        if why is None:
            raise UserError(f"{name} is not a segpipe checkpoint (not a torch file)") from None
        raise UserError(f"refusing to load {name}: it holds objects other than tensors and plain containers "
                        f"(weights_only=True: {why[:160]}); only load checkpoints you trust") from None
    except Exception as exc:  # not a torch file, truncated, ...
        raise UserError(f"{name} is not a readable segpipe checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or not {"model", "model_name", "options"} <= set(state):
        raise UserError(f"{name} is not a segpipe checkpoint (no model / model_name / options)")
    return state


def check_resume_checkpoints(storage_path: str, run_name: str) -> None:
    """Before Ray starts: every checkpoint a resumed run could restore loads with weights_only=True
    (a crafted state.pt on shared storage is refused here, with one `error:` line)."""
    run_dir = storage.join(storage_path, run_name)
    if not storage.exists(run_dir):
        return
    for d in storage.list_dirs(run_dir):
        if not d.startswith("checkpoint_"):
            continue
        path = storage.join(run_dir, d, "state.pt")
        if not storage.exists(path):
            continue
        try:
            if storage.is_uri(path):
                import io

                fs, inner = storage.filesystem(path)
                with fs.open_input_stream(inner) as f:
                    load_state(io.BytesIO(f.read()), name=path)
            else:
                load_state(path)
        except UserError as exc:
            raise UserError(f"{exc} (train.resume, ray.storage_path)") from None


def load_checkpoint_model(path: str | Path):
    """A state.pt of a Ray checkpoint or a <family>-seed<N>.pt -> (eval-mode model, state dict)."""
    from seg_models import build_model

    state = load_state(path)
    model = build_model(state["model_name"], num_classes=NUM_CLASSES, **state["options"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def train(p: Params, family: str | None = None, progress: bool = True, *, label: str = "",
          checked: bool = False) -> dict:
    """One run. `label` prefixes its progress lines (default the family); `checked`: train_all
    already checked the data, the store and the shards once for every run."""
    from pipeline import tracking

    job = resolve_job(p, family)
    job.label = label
    p = job.params  # with the family's own train block merged
    if not checked:
        check_data(p)
        tracking.preflight(p)  # the store answers and is writable (else one error line), before Ray
        if p.data.verify_shards:
            from pipeline.data.loaders import verify_shards

            verify_shards(p.data.dir)  # every shard against manifest.json, before Ray
    job.storage_path = storage.resolve(p.ray.storage_path)  # local/shared path or s3://, gs://
    job.ray_name = _ray_run_name(job, job.storage_path)
    if p.train.resume:
        check_resume_checkpoints(job.storage_path, job.ray_name)
    marker = storage.join(job.storage_path, job.ray_name, "segpipe_run.json")
    if p.train.resume and storage.exists(marker):
        job.run_id = json.loads(storage.read_text(marker))["mlflow_run_id"]
        tracking.client(job.tracking_uri).update_run(job.run_id, status="RUNNING")
    else:
        job.run_id = tracking.start_run(job.tracking_uri, p, family=job.family, model=job.model,
                                        options=job.options, stage="train",
                                        extra_tags={"train_split": "train", "eval_split": "val"})
        storage.write_text(marker, json.dumps({"mlflow_run_id": job.run_id}) + "\n")
    print(f"[{job.label or job.family}] training {job.model} on {p.ray.num_workers} worker(s), MLflow run {job.run_id}", flush=True)
    started = time.time()
    status = "FAILED"
    try:
        ray_init(p)
        try:
            with ProgressPrinter() as queue:
                result = fit(job, callbacks=[make_epoch_callback(job, queue)])
        except Exception as exc:  # Ray wraps worker errors; find ours
            text = str(exc)
            if WORKER_ERROR in text:
                import re

                m = re.search(re.escape(WORKER_ERROR) + r"(.*)", text)
                raise UserError(m.group(1).strip()) from None
            if "loss became NaN" in text:
                import re

                m = re.search(r"loss became NaN at epoch \d+ step \d+", text)
                raise TrainingFailed(m.group(0) if m else "loss became NaN") from None
            raise
        summary = finish(job, result, time.time() - started)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(job.tracking_uri, job.run_id, status)


def finish(job: Job, result, seconds: float) -> dict:
    """Artifacts and DVC outputs once fit() returned."""
    import mlflow
    import torch

    from pipeline import tracking
    from pipeline.reporting.figures import confusion_png, prediction_grid

    p = job.params
    final = dict(result.metrics or {})
    cm = final.pop("val/confusion_matrix", None)
    with result.checkpoint.as_directory() as d:
        model, state = load_checkpoint_model(Path(d) / "state.pt")
    models_dir = Path(p.train.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(job.family, p.seed)
    out_model = models_dir / f"{stem}.pt"
    torch.save({"model_name": job.model, "options": job.options, "model": state["model"], "epoch": state["epoch"],
                "mlflow_run_id": job.run_id, "eval_size": p.train.eval_size}, out_model)

    c = tracking.client(job.tracking_uri)
    history = {}
    for key in ("train/loss", "train/lr", "train/img_per_s", "val/mIoU", "val/pixel_acc", "val/mean_acc", "val/fwIoU"):
        for m in c.get_metric_history(job.run_id, key):
            history.setdefault(m.step, {})[key] = m.value
    metrics_dir = Path(p.train.reports_dir) / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    summary = {"family": job.family, "model": job.model, "seed": p.seed, "epochs": p.train.epochs,
               "mlflow_run_id": job.run_id, "train_seconds": round(seconds, 1),
               **{k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("val/") and not k.startswith("val/iou/")},
               # classes absent from target and prediction have no IoU (NaN): left out, so the file is valid JSON
               "per_class_iou": {k.split("/")[-1]: v for k, v in final.items() if k.startswith("val/iou/") and v == v}}
    last = history.get(max(history), {}) if history else {}
    if "train/img_per_s" in last:
        summary["img_per_s"] = round(last["train/img_per_s"], 2)
    # the DVC metric holds a few numbers (one `dvc exp show` column each); ids, strings and the
    # per-class IoU go to the sibling <stem>_detail.json (not a DVC metric)
    keys = ("mIoU", "pixel_acc", "mean_acc", "img_per_s", "train_seconds")
    numbers = {k: summary[k] for k in keys if isinstance(summary.get(k), (int, float)) and summary[k] == summary[k]}
    (metrics_dir / f"{stem}.json").write_text(json.dumps(numbers, indent=2) + "\n")
    (metrics_dir / f"{stem}_detail.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    with open(metrics_dir / f"{stem}_epochs.csv", "w", newline="") as f:
        cols = ["epoch", "train/loss", "train/lr", "train/img_per_s", "val/mIoU", "val/pixel_acc", "val/mean_acc", "val/fwIoU"]
        w = csv.writer(f)
        w.writerow([c.replace("/", "_") for c in cols])
        for step in sorted(history):
            w.writerow([step] + [history[step].get(k, "") for k in cols[1:]])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if cm is not None:
            confusion_png(cm, tmp / "confusion_matrix.png", title=f"{job.family} ({job.model}) val confusion matrix")
            with open(tmp / "confusion_matrix.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["true\\pred", *VOC_CLASSES])
                for name, row in zip(VOC_CLASSES, cm):
                    w.writerow([name, *row])
        if p.train.sample_images:
            prediction_grid(model, p.data.dir, p.train.eval_size, p.train.sample_images, tmp / "predictions.png",
                            title=f"{job.family} ({job.model}): image | truth | prediction")
        for f in tmp.iterdir():
            c.log_artifact(job.run_id, str(f))
        c.log_artifact(job.run_id, str(metrics_dir / f"{stem}_epochs.csv"))
        c.log_artifact(job.run_id, str(out_model), artifact_path=tracking.CHECKPOINT_ARTIFACT)  # what predict/report load
        with tracking.fluent_uri(job.tracking_uri), mlflow.start_run(run_id=job.run_id):
            example = torch.zeros(1, 3, p.train.eval_size, p.train.eval_size)
            with torch.no_grad():
                out = model(example)["out"]
            sig = mlflow.models.infer_signature(example.numpy(), out.numpy())
            mlflow.pytorch.log_model(model, name="model", signature=sig, serialization_format="pickle",
                                     pip_requirements=["torch", "torchvision"],
                                     code_paths=[str(REPO / "seg_models")])
    return summary


def output_stem(family: str, seed: int) -> str:
    """<family>-seed<N>: the name of a run's DVC outputs (model, metrics JSON, epoch CSV)."""
    return f"{family}-seed{seed}"


def run(p: Params, args) -> int:
    if getattr(args, "all", False):
        return run_all(p, args)
    if args.seed is not None:
        if args.seed < 0:
            raise UserError(f"seed must be >= 0, got {args.seed} (--seed)")
        p = p.model_copy(update={"seed": args.seed})
    summary = train(p, family=args.family, progress=not args.quiet)
    print(f"[{summary['family']}] done: val mIoU {summary.get('mIoU', float('nan')):.3f}, "
          f"pixel acc {summary.get('pixel_acc', float('nan')):.3f} in {summary['train_seconds']:.0f}s "
          f"(MLflow run {summary['mlflow_run_id']})")
    return 0


# ------------------------------------------------------------------------------ train --all


@dataclass
class RunOutcome:
    family: str
    seed: int
    summary: dict | None = None
    error: str = ""
    exit_code: int = 0

    @property
    def name(self) -> str:
        return f"{self.family}/seed{self.seed}"


def train_all(p: Params, progress: bool = True) -> list[RunOutcome]:
    """Every family x seed of `p` at once, each run the `train()` of the one-by-one path (its own
    TorchTrainer, MLflow run and DVC outputs) in its own driver thread.

    Threads on the driver, not Ray tasks: TorchTrainer.fit() from a non-main thread is what Ray
    Train V2 supports (Ray Tune runs trainers that way); its controller is a 0-CPU actor, so what
    runs at once is decided by Ray's scheduler from each run's placement group (ray.num_workers x
    {CPU: ray.cpus_per_worker, GPU: 1 on GPUs}); a run whose group does not fit yet waits (Train V2
    retries its worker-group start) and starts when another finishes. The driver writes the DVC
    outputs (models/, reports/metrics/) where the one-by-one path writes them, on the driver's
    machine. Everything is checked before Ray starts; a failing run is reported with its name and
    the others finish. Returns one RunOutcome per run in params order."""
    import threading

    from pipeline import tracking

    pairs = [(fam, seed) for fam in p.families for seed in p.seeds]
    if not pairs:
        raise UserError("params.yaml has no families to train (families; train --all)")
    # bad input stops everything before Ray and before any MLflow run: every family builds,
    # the data and the store answer, the shards match their manifest (once, not per run)
    for fam in p.families:
        resolve_job(p, fam)
    check_data(p)
    uri = tracking.resolve_tracking_uri(p.mlflow.tracking_uri)
    tracking.preflight(p)
    if p.data.verify_shards:
        from pipeline.data.loaders import verify_shards

        verify_shards(p.data.dir)
    tracking.experiment_id(tracking.client(uri), p.mlflow.experiment)  # created once, not raced by the runs
    ray_init(p)
    print(f"training {len(pairs)} runs at once ({len(p.families)} families x seeds {p.seeds}), "
          f"each {p.ray.num_workers} worker(s) x {p.ray.cpus_per_worker} CPU", flush=True)

    outcomes = [RunOutcome(fam, seed) for fam, seed in pairs]

    def one(o: RunOutcome) -> None:
        try:
            o.summary = train(p.model_copy(update={"seed": o.seed}), o.family, progress, label=o.name, checked=True)
            print(f"[{o.name}] done: val mIoU {o.summary.get('mIoU', float('nan')):.3f}, "
                  f"pixel acc {o.summary.get('pixel_acc', float('nan')):.3f} in {o.summary['train_seconds']:.0f}s "
                  f"(MLflow run {o.summary['mlflow_run_id']})", flush=True)
        except UserError as exc:
            o.error, o.exit_code = str(exc), exc.exit_code
        except Exception as exc:  # unexpected: named, the other runs go on
            o.error, o.exit_code = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}", 1
        if o.error:
            print(f"[{o.name}] failed: {o.error}", flush=True)

    # fluent MLflow calls (model logging) set the process-wide tracking URI: hold it on the
    # store for the whole batch, so one run's restore never points another at a different store
    with tracking.fluent_uri(uri):
        threads = [threading.Thread(target=one, args=(o,), name=f"train-{o.name}", daemon=True) for o in outcomes]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
        except KeyboardInterrupt:
            import ray

            ray.shutdown()  # ends every run's controller and workers (they belong to this driver)
            for t in threads:
                t.join(timeout=30)
            raise
    return outcomes


def run_all(p: Params, args) -> int:
    if args.family or args.seed is not None:
        raise UserError("--all trains every family x seed of params.yaml: drop --family / --seed "
                        "(or narrow families / seeds with -S)")
    started = time.time()
    outcomes = train_all(p, progress=not args.quiet)
    print(f"train --all: {sum(not o.error for o in outcomes)}/{len(outcomes)} runs finished in "
          f"{time.time() - started:.0f}s", flush=True)
    for o in outcomes:
        if o.summary:
            print(f"  {o.name:<22} val mIoU {o.summary.get('mIoU', float('nan')):.3f}  "
                  f"{o.summary['train_seconds']:.0f}s  MLflow run {o.summary['mlflow_run_id']}")
        else:
            print(f"  {o.name:<22} FAILED: {o.error}")
    failed = [o for o in outcomes if o.error]
    if failed:
        # exit 2 when every failure was bad input (as `segpipe train` exits 2), else 1
        err = UserError(f"{len(failed)} of {len(outcomes)} runs failed: "
                        + "; ".join(f"{o.name}: {o.error}" for o in failed))
        err.exit_code = 2 if all(o.exit_code == 2 for o in failed) else 1
        raise err
    return 0
