"""A training run on the driver: resolve and check the job (bad input never starts Ray), open its
MLflow run, fit the TorchTrainer, then write the outputs and log them.

`train()` is one run (`segpipe train`, and each run of `train --all`); `fit()` builds and runs the
TorchTrainer (also used by every Ray Tune trial and by `segpipe bench ray`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import tempfile
import threading
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import storage, system, tracking
from pipeline.config import Params, family_params
from pipeline.data.checks import check_shards
from pipeline.data.loaders import load_manifest, verify_shards
from pipeline.data.voc import NUM_CLASSES
from pipeline.errors import UserError
from pipeline.figures.run import confusion_png, prediction_grid
from pipeline.tracking import train as track
from pipeline.training import dist as collective
from pipeline.training import outputs
from pipeline.training.inference import predict_images
from pipeline.training.checkpoint import check_resume_checkpoints, load_checkpoint_model, save_model_file
from pipeline.training.resources import check_batches, check_fit, check_outputs
from pipeline.training.spec import WorkerSpec
from pipeline.training.progress import ProgressPrinter, make_epoch_callback
from pipeline.training.worker import FAILURE_KEY, WORKER_ERROR, train_loop_per_worker
from seg_models import build_model, list_models, model_info
from seg_models.summary import aspp_note

log = logging.getLogger(__name__)


class TrainingFailed(UserError):
    """The run started but failed (e.g. NaN loss): `error: ...`, exit 1."""

    exit_code = 1


@dataclass(frozen=True)
class Job:
    """Everything a training run needs, resolved and validated on the driver: the validated params
    (the family's train block merged) and the WorkerSpec its workers get. Immutable: the steps of a
    run (where its checkpoints go, its MLflow run) derive a new Job with :meth:`with_`."""

    family: str
    model: str
    options: dict
    params: Params
    tracking_uri: str
    spec: WorkerSpec
    run_id: str = ""
    storage_path: str = ""
    ray_name: str = ""
    label: str = ""  # progress-line prefix (train --all: <family>/seed<N>); default the family

    def with_(self, **changes) -> "Job":
        return dataclasses.replace(self, **changes)


def resolve_job(p: Params, family: str | None) -> Job:
    """Pick the model for `family` (or train.model) and check it builds with its options."""
    if family:
        if family not in p.families:
            raise UserError(f"unknown family {family!r}: params.yaml families has {sorted(p.families)} (--family)")
        p = family_params(p, family)  # families.<family>.train over the shared train block
        model, options = p.families[family].model, dict(p.families[family].options)
        options.update(p.train.model_options)
    else:
        model, options = p.train.model, dict(p.train.model_options)
    check_model(model, options, where=f"families.{family}.model" if family else "train.model")
    if p.train.iterations:
        p = with_iterations(p)
    fam = family or model_info(model)["family"]
    spec = WorkerSpec.from_params(p, model=model, options=options, data_dir=storage.resolve(p.data.dir))
    return Job(family=fam, model=model, options=options, params=p, spec=spec,
               tracking_uri=tracking.resolve_tracking_uri(p.mlflow.tracking_uri))


def with_iterations(p: Params) -> Params:
    """train.iterations as whole epochs of the train split at the global batch (train.epochs set to it)."""
    images = load_manifest(p.data.dir)["splits"].get("train", {}).get("count", 0)
    steps = max(1, images // (p.train.batch_size * p.ray.num_workers))  # the last incomplete batch is dropped
    epochs = max(1, round(p.train.iterations / steps))
    log.info(f"train.iterations {p.train.iterations}: {epochs} epochs of {steps} steps = {epochs * steps} iterations")
    return p.model_copy(update={"train": p.train.model_copy(update={"epochs": epochs})})


def check_model(model: str, options: dict, where: str = "train.model") -> None:
    """Build on the meta device: instant, and every bad name / option surfaces before Ray starts."""
    if model not in list_models():
        raise UserError(f"unknown model {model!r}; `segpipe models` lists {', '.join(list_models())} ({where})")
    try:
        with torch.device("meta"):
            build_model(model, num_classes=NUM_CLASSES, **options)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{model}: {exc} (model options)") from None


def check_data(p: Params) -> dict:
    """The shards the run reads, checked against themselves (data.checks.check_shards): no empty
    split, manifest counts = listed rows, ids unique, val disjoint from train and tune."""
    manifest = load_manifest(p.data.dir)
    check_shards(p.data.dir, manifest)
    return manifest


def preflight(p: Params) -> None:
    """Once before Ray: the shards exist, the store answers and is writable, the shards match their
    manifest, the train split holds one global batch."""
    manifest = check_data(p)
    tracking.preflight(p)  # the store answers and is writable (else one error line), before Ray
    if p.data.verify_shards:
        verify_shards(p.data.dir)  # every shard against manifest.json, before Ray
    check_batches(p, manifest)


def ray_init(p: Params) -> bool:
    """Ray for this command: ray.address / RAY_ADDRESS, else a local one (system.ray_init)."""
    return system.ray_init(p.ray.address)


def use_gpu(p: Params) -> bool:
    return system.ray_has_gpu() if p.ray.use_gpu == "auto" else bool(p.ray.use_gpu)


def ray_run_name(job: Job, storage_path: str) -> str:
    """resume: the latest run of this family/model/seed under storage; else a new one, named by the
    time and a random suffix: two runs of the same family and seed started in the same second (two
    terminals, two `train --all` jobs) never share a run directory, checkpoints or segpipe_run.json."""
    prefix = f"{job.family}-{job.model}-seed{job.params.seed}"
    if job.params.train.resume:
        runs = [d for d in storage.list_dirs(storage_path) if d.startswith(prefix + "-")]
        if runs:
            return runs[-1]
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def fit(job: Job, callbacks: list | None = None):
    """Build and run the TorchTrainer for `job` (used by train and by every tune trial). A run its
    workers ended on a deterministic failure (worker.FAILURE_KEY: not retried) raises it here."""
    p = job.params
    gpu = use_gpu(p)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.spec,
        torch_config=collective.torch_config("nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=p.ray.num_workers, use_gpu=gpu, placement_strategy=p.ray.placement_strategy,
                                     resources_per_worker={"CPU": p.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name=job.ray_name, storage_path=job.storage_path,
                             failure_config=FailureConfig(max_failures=p.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks or []),
    )
    result = trainer.fit()
    returned = result.return_value
    if isinstance(returned, dict) and FAILURE_KEY in returned:
        raise RuntimeError(returned[FAILURE_KEY])  # _worker_failure makes it the run's `error:` line
    return result


ACTIVE_RUNS: dict[str, str] = {}  # MLflow run id -> tracking URI of this driver's runs in flight


def wait_interruptibly(threads: list[threading.Thread]) -> None:
    """Wait for driver threads running fit(); on Ctrl-C / SIGTERM (a KeyboardInterrupt in the main
    thread) end every run in flight KILLED (ACTIVE_RUNS) and go on as the interrupt. Ray is left
    alone: the CLI ends the process (pipeline.cli.entry), and a driver's end ends its Ray job, its
    Train controllers and workers; shutting Ray down under the threads still in Ray calls makes
    Ray's core worker end the process with exit 1 before anything is said."""
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        for run_id, uri in list(ACTIVE_RUNS.items()):
            try:
                tracking.end_run(uri, run_id, "KILLED")
            except Exception:  # the store is gone too: nothing more to do on the way out
                pass
        raise


@contextlib.contextmanager
def _inactive(run_id: str):
    """Out of ACTIVE_RUNS once the run's block ends, however it ends."""
    try:
        yield
    finally:
        ACTIVE_RUNS.pop(run_id, None)


def _fit_in_thread(job: Job, callbacks: list):
    """fit() in a driver thread, the main thread waiting (wait_interruptibly): Ray Train installs
    its own SIGINT handler when fit() runs in the main thread, and a Ctrl-C then ends the run as a
    failure (exit 1, FAILED). In a thread (train --all's runs, Tune's trials) it installs none."""
    if threading.current_thread() is not threading.main_thread():
        return fit(job, callbacks=callbacks)
    box: dict = {}

    def target():
        try:
            box["result"] = fit(job, callbacks=callbacks)
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"train-{job.family}", daemon=True)
    thread.start()
    wait_interruptibly([thread])
    if "error" in box:
        raise box["error"]
    return box["result"]


def _worker_failure(exc: Exception) -> UserError | None:
    """Ray wraps worker errors: ours become one `error:` line (bad input exit 2, NaN loss exit 1)."""
    text = str(exc)
    if WORKER_ERROR in text:
        return UserError(re.search(re.escape(WORKER_ERROR) + r"(.*)", text).group(1).strip())
    if "loss became NaN" in text:
        m = re.search(r"loss became NaN at epoch \d+ step \d+", text)
        return TrainingFailed(m.group(0) if m else "loss became NaN")
    return None


def train(p: Params, family: str | None = None, progress: bool = True, *, label: str = "",
          checked: bool = False) -> dict:
    """One run. `label` prefixes its progress lines (default the family); `checked`: train_all
    already checked the data, the store and the shards once for every run."""
    job = resolve_job(p, family)
    p = job.params  # with the family's own train block merged
    if not checked:
        preflight(p)
        check_fit(p)  # workers that can never be placed would wait forever
    check_outputs(p, job.model, job.options)  # found after the last epoch otherwise
    storage_path = storage.resolve(p.ray.storage_path)  # local/shared path or s3://, gs://
    job = job.with_(label=label, storage_path=storage_path, ray_name=ray_run_name(job, storage_path))
    if p.train.resume:
        check_resume_checkpoints(job.storage_path, job.ray_name)
    job = job.with_(run_id=track.open_run(job))
    log.info(f"[{job.label or job.family}] training {job.model} on {p.ray.num_workers} worker(s), MLflow run {job.run_id}")
    note = aspp_note(job.model, p.train.crop_size, job.options)
    if note:  # what each atrous branch sees at this crop (a degenerate one is a 1x1 conv)
        log.info(f"[{job.label or job.family}] {note}")
    started = time.time()
    ACTIVE_RUNS[job.run_id] = job.tracking_uri
    with tracking.ending_run(job.tracking_uri, job.run_id), _inactive(job.run_id):
        ray_init(p)
        try:
            # -q: no progress channel at all (no queue actor, no printing thread)
            with (ProgressPrinter() if progress else contextlib.nullcontext()) as queue:
                result = _fit_in_thread(job, [make_epoch_callback(job, queue)])
        except Exception as exc:
            failure = _worker_failure(exc) or tracking.store_failure(exc, job.tracking_uri, job.run_id)
            if failure is None:
                raise
            raise failure from None
        return finish(job, result, time.time() - started)


def finish(job: Job, result, seconds: float) -> dict:
    """Once fit() returned: the model file and metrics files (DVC outputs), then the run's artifacts."""
    p = job.params
    final = dict(result.metrics or {})
    cm = final.pop("val/confusion_matrix", None)
    with result.checkpoint.as_directory() as d:
        model, state = load_checkpoint_model(Path(d) / "state.pt")
    stem = outputs.output_stem(job.family, p.seed)
    out_model = save_model_file(Path(p.train.models_dir) / f"{stem}.pt", model_name=job.model, options=job.options,
                                state=state, run_id=job.run_id, eval_size=p.train.eval_size)
    history = {int(k): v for k, v in (result.return_value or {}).items()}  # what the run itself returned
    summary = outputs.summarize(job, final, history, seconds)
    epochs_csv = outputs.write_metrics(Path(p.train.reports_dir) / "metrics", stem, summary, history)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if cm is not None:
            confusion_png(cm, tmp / "confusion_matrix.png", title=f"{job.family} ({job.model}) val confusion matrix")
            outputs.write_confusion_csv(cm, tmp / "confusion_matrix.csv")
        if p.train.sample_images:
            rows = predict_images(model, p.data.dir, p.train.eval_size, p.train.sample_images)
            prediction_grid(rows, tmp / "predictions.png",
                            title=f"{job.family} ({job.model}): image | truth | prediction")
        files = sorted(f for f in tmp.iterdir() if not f.name.startswith("."))
        track.log_outputs(job.tracking_uri, job.run_id, [*files, epochs_csv], out_model, model, p.train.eval_size)
    return summary


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


def _check_all(p: Params) -> str:
    """train --all: bad input stops everything before Ray and before any MLflow run: every family
    builds, the data and the store answer, the shards match their manifest (once, not per run)."""
    if not p.families or not p.seeds:
        raise UserError("params.yaml has no families to train (families; train --all)")
    for fam in p.families:
        resolve_job(p, fam)
    preflight(p)
    check_fit(p)
    uri = tracking.resolve_tracking_uri(p.mlflow.tracking_uri)
    tracking.experiment_id(tracking.client(uri), p.mlflow.experiment)  # created once, not raced by the runs
    return uri


def _run_one(p: Params, o: RunOutcome, progress: bool) -> None:
    """One run of train --all in its driver thread; its failure is recorded, never raised."""
    try:
        o.summary = train(p.model_copy(update={"seed": o.seed}), o.family, progress, label=o.name, checked=True)
        log.info(f"[{o.name}] done: val mIoU {o.summary.get('mIoU', float('nan')):.3f}, "
                 f"pixel acc {o.summary.get('pixel_acc', float('nan')):.3f} in {o.summary['train_seconds']:.0f}s "
                 f"(MLflow run {o.summary['mlflow_run_id']})")
    except UserError as exc:
        o.error, o.exit_code = str(exc), exc.exit_code
    except Exception as exc:  # unexpected: named, the other runs go on
        o.error, o.exit_code = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}", 1
    if o.error:
        log.info(f"[{o.name}] failed: {o.error}")


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
    uri = _check_all(p)
    ray_init(p)
    log.info(f"training {len(p.families) * len(p.seeds)} runs at once ({len(p.families)} families x seeds {p.seeds}), "
             f"each {p.ray.num_workers} worker(s) x {p.ray.cpus_per_worker} CPU")
    outcomes = [RunOutcome(fam, seed) for fam in p.families for seed in p.seeds]
    # fluent MLflow calls (model logging) set the process-wide tracking URI: hold it on the
    # store for the whole batch, so one run's restore never points another at a different store
    with tracking.fluent_uri(uri):
        threads = [threading.Thread(target=_run_one, args=(p, o, progress), name=f"train-{o.name}", daemon=True)
                   for o in outcomes]
        for t in threads:
            t.start()
        wait_interruptibly(threads)
    return outcomes
