"""Per-epoch progress of a Ray Train run: the controller-side callback (logs each reported epoch to
MLflow, sends one progress line) and the driver-side printer of those lines."""

from __future__ import annotations

import logging
import threading
import time

from ray.train import UserCallback
from ray.util.queue import Empty, Queue

from pipeline.tracking import log_metrics

log = logging.getLogger(__name__)


class EpochLogger(UserCallback):
    """Runs in the Ray Train controller: each report -> MLflow metrics at step=epoch, and one line
    `[label] epoch E/N  loss ...  img/s  val mIoU ...  ETA` into `progress_queue` (None: no line,
    as in Tune trials, where Tune prints its own table)."""

    def __init__(self, uri: str, run_id: str, epochs: int, label: str, progress_queue=None):
        self.uri, self.run_id, self.epochs, self.label, self.queue = uri, run_id, epochs, label, progress_queue
        self.t0 = time.time()  # the run's start (Ray set-up included), so the first ETA is honest
        self.first_epoch = None

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        epoch = int(m["epoch"])
        if self.first_epoch is None:  # a resumed run starts counting at its first new epoch
            self.first_epoch = epoch - 1
        log_metrics(self.uri, self.run_id, {k: v for k, v in m.items() if k.startswith(("train/", "val/"))}, step=epoch)
        done = epoch - self.first_epoch
        eta = (time.time() - self.t0) / max(1, done) * (self.epochs - epoch)
        val = f"  val mIoU {m['val/mIoU']:.3f}" if "val/mIoU" in m else ""
        if self.queue is not None:
            self.queue.put(f"[{self.label}] epoch {epoch}/{self.epochs}  loss {m['train/loss']:.4f}  "
                           f"{m['train/img_per_s']:.1f} img/s{val}  ETA {int(eta) // 60}m{int(eta) % 60:02d}s")


def make_epoch_callback(job, progress_queue=None) -> EpochLogger:
    """The EpochLogger of a pipeline.training.job.Job (its run id, epochs, label)."""
    return EpochLogger(job.tracking_uri, job.run_id, job.params.train.epochs, job.label or job.family, progress_queue)


class _Pump:
    """The thread printing what arrives on the queue until stopped (then it prints what is left)."""

    def __init__(self, queue):
        self.queue = queue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                log.info(self.queue.get(timeout=0.5))
            except Empty:
                if self._stop.is_set():
                    return
            except Exception:  # the queue actor is gone (Ray shutting down)
                return

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


class ProgressPrinter:
    """Driver side of the progress channel, entered by each run: one Ray queue actor per driver
    process and Ray connection, kept for the process's later runs, and one printing thread while
    any run is in flight. train --all's concurrent runs (and a notebook's or a test's successive
    ones) share the actor instead of starting one each: an actor is a process, ~1.3 CPU-s to start
    on 2 cores. Every line names its run. The actor ends with the driver (Ray kills the actors of a
    job whose driver exits); the thread stops, after printing what is left, when the last run in
    flight leaves."""

    _lock = threading.Lock()
    _queue = None
    _queue_job = None  # the Ray job (connection) the queue actor belongs to
    _pump: _Pump | None = None
    _users = 0

    def __enter__(self):
        import ray

        cls = ProgressPrinter
        with cls._lock:
            job = ray.get_runtime_context().get_job_id()
            if cls._queue is None or cls._queue_job != job:  # first run, or Ray was restarted
                cls._queue, cls._queue_job = Queue(actor_options={"num_cpus": 0}), job
            if cls._users == 0:
                cls._pump = _Pump(cls._queue)
            cls._users += 1
            return cls._queue

    def __exit__(self, *exc):
        cls = ProgressPrinter
        with cls._lock:
            cls._users -= 1
            if cls._users == 0 and cls._pump is not None:
                cls._pump.stop()
                cls._pump = None
