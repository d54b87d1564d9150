"""MLflow conventions of DESIGN.md in one place: tracking URI resolution, run creation with the
standard tags and flattened params, metric logging and final status."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
from pathlib import Path

from pipeline.config import Params, flatten


def resolve_tracking_uri(uri: str) -> str:
    """`sqlite:///relative.db` -> absolute, so Ray workers and the controller (other cwd) write
    the same store. MLFLOW_TRACKING_URI, when set, wins (as for every MLflow tool)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


@contextlib.contextmanager
def fluent_uri(uri: str):
    """mlflow.set_tracking_uri for a block. set_tracking_uri also exports MLFLOW_TRACKING_URI,
    which would send every later run of this process to this store: restore both after."""
    import mlflow

    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_id(c, name: str) -> str:
    """Get or create; with a sqlite store the artifacts go to mlruns/ beside the database file
    (absolute), not to the current directory of whichever process logs first."""
    exp = c.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    uri = c.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)


def start_run(uri: str, p: Params, *, family: str, model: str, options: dict, stage: str,
              run_name: str | None = None, parent_run_id: str | None = None, extra_tags: dict | None = None) -> str:
    """Create a run with the DESIGN.md tags and every param flattened; returns its id."""
    from mlflow.entities import Param

    c = client(uri)
    tags = {"family": family, "model": model, "seed": str(p.seed), "data_source": str(p.data.source),
            "git_commit": git_commit(), "stage": stage, "profile": p.profile, **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(c, p.mlflow.experiment), run_name=run_name or f"{family}-{model}-{p.seed}", tags=tags)
    flat = flatten(p.model_dump(mode="json"))
    flat.update({f"model_options.{k}": v for k, v in flatten(options).items()})
    flat["model"] = model
    try:  # the ASPP dilations the model really uses (atrous_rates_at scales the rates with the output stride)
        from seg_models import effective_atrous_rates

        rates = effective_atrous_rates(model, **options)
    except ValueError:
        rates = None
    if rates is not None:
        flat["model_effective.atrous_rates"] = list(rates)
    params = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict, step: int) -> None:
    """Numeric, finite metrics only (a class absent from target and prediction has no IoU)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, len(batch), 500):
        client(uri).log_batch(run_id, metrics=batch[i:i + 500])


def end_run(uri: str, run_id: str, status: str) -> None:
    client(uri).set_terminated(run_id, status=status)
