"""The files a training run leaves (DVC outputs and the run's small artifacts), written once.

<reports_dir>/metrics/<stem>.json (the DVC metric: mIoU, pixel_acc, mean_acc, img_per_s,
train_seconds; numbers only, one `dvc exp show` column each), <stem>_detail.json (ids, strings,
per-class IoU), <stem>_epochs.csv (one row per logged epoch) and confusion_matrix.csv; stem =
<family>-seed<N>. Every file is written to a temporary name beside it and renamed, so a reader
(or DVC) never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline import storage
from pipeline.data.voc import VOC_CLASSES

EPOCH_COLUMNS = ["epoch", "train/loss", "train/lr", "train/img_per_s", "val/mIoU", "val/pixel_acc", "val/mean_acc",
                 "val/fwIoU"]
DVC_METRIC_KEYS = ("mIoU", "pixel_acc", "mean_acc", "img_per_s", "train_seconds")


def output_stem(family: str, seed: int) -> str:
    """<family>-seed<N>: the name of a run's DVC outputs (model, metrics JSON, epoch CSV)."""
    return f"{family}-seed{seed}"


def write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(path, text)
    return path


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def summarize(job, final: dict, history: dict[int, dict[str, float]], seconds: float) -> dict:
    """The run's summary: ids, the final val metrics (per-class IoU apart), img/s of the last epoch."""
    p = job.params
    summary = {"family": job.family, "model": job.model, "seed": p.seed, "epochs": p.train.epochs,
               "mlflow_run_id": job.run_id, "train_seconds": round(seconds, 1),
               **{k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("val/") and not k.startswith("val/iou/")},
               # classes absent from target and prediction have no IoU (NaN): left out, so the file is valid JSON
               "per_class_iou": {k.split("/")[-1]: v for k, v in final.items() if k.startswith("val/iou/") and v == v}}
    last = history.get(max(history), {}) if history else {}
    if "train/img_per_s" in last:
        summary["img_per_s"] = round(last["train/img_per_s"], 2)
    return summary


def write_metrics(metrics_dir: Path, stem: str, summary: dict, history: dict[int, dict[str, float]]) -> Path:
    """<stem>.json, <stem>_detail.json and <stem>_epochs.csv; returns the CSV's path."""
    numbers = {k: summary[k] for k in DVC_METRIC_KEYS
               if isinstance(summary.get(k), (int, float)) and summary[k] == summary[k]}
    write_text_atomic(metrics_dir / f"{stem}.json", json.dumps(numbers, indent=2) + "\n")
    write_text_atomic(metrics_dir / f"{stem}_detail.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
    rows = [[c.replace("/", "_") for c in EPOCH_COLUMNS]]
    rows += [[step] + [history[step].get(k, "") for k in EPOCH_COLUMNS[1:]] for step in sorted(history)]
    return write_text_atomic(metrics_dir / f"{stem}_epochs.csv", _csv_text(rows))


def write_confusion_csv(cm: list[list[int]], path: Path) -> Path:
    rows = [["true\\pred", *VOC_CLASSES]] + [[name, *row] for name, row in zip(VOC_CLASSES, cm)]
    return write_text_atomic(path, _csv_text(rows))
