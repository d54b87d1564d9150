"""The MLflow side of `segpipe train`: open (or re-open, train.resume) the run, log the
run's files and the model at the end.

Names (contract, see docs/architecture.md): a run per family x seed with stage=train tags
(pipeline.tracking.runs.start_run), metrics train/loss, train/lr, train/img_per_s, val/mIoU,
val/pixel_acc, val/mean_acc, val/fwIoU, val/iou/<class> per epoch step; artifacts
confusion_matrix.png/.csv, predictions.png, <family>-seed<N>_epochs.csv, checkpoint/<family>-seed<N>.pt
and the logged model `model`. The marker <ray.storage_path>/<ray run>/segpipe_run.json ties a Ray
run directory to its MLflow run so a resumed run logs into the same one.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch

from pipeline import storage
from pipeline.storage import REPO
from pipeline.tracking.runs import CHECKPOINT_ARTIFACT, start_run
from pipeline.tracking.store import client, fluent_uri


def open_run(job) -> str:
    """The MLflow run of `job` (a pipeline.training.job.Job with storage_path and ray_name set):
    with train.resume and a marker under the Ray run directory, that run, set RUNNING again; else
    a new stage=train run, whose id goes into the marker."""
    p = job.params
    marker = storage.join(job.storage_path, job.ray_name, "segpipe_run.json")
    if p.train.resume and storage.exists(marker):
        run_id = json.loads(storage.read_text(marker))["mlflow_run_id"]
        client(job.tracking_uri).update_run(run_id, status="RUNNING")
        return run_id
    run_id = start_run(job.tracking_uri, p, family=job.family, model=job.model, options=job.options, stage="train",
                       extra_tags={"train_split": "train", "eval_split": "val"})
    storage.write_text(marker, json.dumps({"mlflow_run_id": run_id}) + "\n")
    return run_id


def log_outputs(uri: str, run_id: str, files: list[Path], model_file: Path, model: torch.nn.Module,
                eval_size: int) -> None:
    """Log `files` at the artifact root, the <family>-seed<N>.pt under `checkpoint/` (what predict and
    report load) and the model itself (signature from one eval-size forward pass)."""
    c = client(uri)
    for f in files:
        c.log_artifact(run_id, str(f))
    c.log_artifact(run_id, str(model_file), artifact_path=CHECKPOINT_ARTIFACT)
    with fluent_uri(uri), mlflow.start_run(run_id=run_id):
        example = torch.zeros(1, 3, eval_size, eval_size)
        with torch.no_grad():
            out = model(example)["out"]
        sig = mlflow.models.infer_signature(example.numpy(), out.numpy())
        mlflow.pytorch.log_model(model, name="model", signature=sig, serialization_format="pickle",
                                 pip_requirements=["torch", "torchvision"], code_paths=[str(REPO / "seg_models")])
