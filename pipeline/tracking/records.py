"""The plain records tracking hands to the layers above: one :class:`RunRecord` per MLflow train run
(params, metrics, tags, histories), how a logged param string reads back as a value, and which
logged params are bookkeeping rather than a setting of the experiment. No MLflow import: these
are filled from run objects by :mod:`pipeline.tracking.report`."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import yaml

# params that are the same thing in every run, or bookkeeping: never listed as "differing"
NOT_A_SETTING = ("seed", "seeds", "families.", "mlflow.", "report.", "train.models_dir", "train.reports_dir",
                 "ray.storage_path", "ray.address", "data.dir", "train.resume")
# params that are bookkeeping for a train run (where files go, how fast data loads, what `segpipe tune`
# would search): never part of the setting that decides whether two seeds are the same experiment
NOT_TRAINING = NOT_A_SETTING + ("tune.", "hp.", "train.model", "train.loader_workers", "train.max_failures",
                                "train.sample_images", "train.eval_every", "data.voc_", "data.sbd_",
                                "data.download_timeout_s", "data.workers", "data.row_group_rows",
                                "data.shard_max_mb", "data.tune_split", "ray.cpus_per_worker")


def parse_param(text: str):
    """An MLflow param string back to a value ("[12, 24, 36]" -> list, "True" -> True); else the text."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if text in ("True", "False"):
        return text == "True"
    return text if v is None or isinstance(v, dict) else v


@dataclass
class RunRecord:
    """What the report uses of one MLflow train run."""

    run_id: str
    family: str
    model: str
    seed: int
    start_ms: int
    end_ms: int
    metrics: dict
    params: dict
    tags: dict
    history: dict = field(default_factory=dict)  # metric -> [(step, value)]
    cm: np.ndarray | None = None
    model_id: str | None = None

    @property
    def train_seconds(self) -> float:
        return max(0.0, (self.end_ms - self.start_ms) / 1000.0)

    @property
    def img_per_s(self) -> float | None:
        vals = [v for _, v in self.history.get("train/img_per_s", [])]
        return statistics.fmean(vals) if vals else None

    def metric(self, name: str) -> float | None:
        v = self.metrics.get(f"val/{name}")
        return None if v is None or not math.isfinite(v) else float(v)

    @property
    def options(self) -> dict:
        return {k[len("model_options."):]: parse_param(v) for k, v in sorted(self.params.items())
                if k.startswith("model_options.")}

    @property
    def eval_size(self) -> int:
        return int(self.params.get("train.eval_size", 0) or 0)
