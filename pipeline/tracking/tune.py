"""The MLflow side of `segpipe tune`: the parent run (stage=tune) of a family's tune, one nested child
run per trial (stage=tune-trial, tags trial_id / mlflow.parentRunId), ASHA's decisions and each
trial's outcome as tags, and the result (best/* metrics, best.* params, files, plots) on the parent.

Every read goes through runs.search_runs (paginated) and runs.find_experiment.
"""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.entities import Metric, Param

from pipeline.config import Params
from pipeline.tracking.runs import find_experiment, search_runs, start_run
from pipeline.tracking.store import client


def _search(uri: str, experiment: str, filter_string: str) -> list:
    c = client(uri)
    exp = find_experiment(c, experiment)
    return [] if exp is None else search_runs(c, exp.experiment_id, filter_string)


def latest_tune(uri: str, experiment: str, family: str):
    """The newest parent run of a tune of `family` (None when there is none)."""
    runs = _search(uri, experiment, f"tags.stage = 'tune' and tags.family = '{family}'")
    return runs[0] if runs else None


def trial_runs(uri: str, experiment: str, parent_run_id: str) -> dict:
    """trial id -> child run, for every trial run of the parent."""
    runs = _search(uri, experiment, f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags.get("trial_id"): r for r in runs}


def find_trial_run(uri: str, experiment: str, parent_run_id: str, trial_id: str):
    runs = _search(uri, experiment, f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.trial_id = '{trial_id}'")
    return runs[0] if runs else None


def metric_history(uri: str, run_id: str, metric: str, timed: bool = False) -> list[tuple]:
    """(step, value) of every logged value of `metric`, by step; timed: (step, value, seconds since
    the epoch when it was logged)."""
    hist = client(uri).get_metric_history(run_id, metric)
    if timed:
        return sorted((m.step, m.value, m.timestamp / 1000) for m in hist)
    return sorted((m.step, m.value) for m in hist)


def reopen(uri: str, run_id: str) -> None:
    """A resumed tune or trial continues its run: RUNNING again."""
    client(uri).update_run(run_id, status="RUNNING")


def start_tune(uri: str, p: Params, *, family: str, model: str, options: dict, ray_experiment: str) -> str:
    return start_run(uri, p, family=family, model=model, options=options, stage="tune", run_name=f"tune-{family}",
                     extra_tags={"ray_experiment": ray_experiment, "tune.search_alg": p.tune.search_alg})


def open_trial_run(uri: str, p: Params, *, family: str, model: str, options: dict, parent_run_id: str,
                   trial_id: str, ray_experiment: str, splits: dict, hp: dict[str, str], phase: str, seed: int,
                   cost: dict) -> str:
    """The trial's child run: the one a resumed trial already has (RUNNING again; the epoch callback
    continues its history), else a new one with the trial's searched values as hp.* params, its phase
    (tag tune.phase) and seed, and the model's size (model/params, model/gflops at the training crop)."""
    existing = find_trial_run(uri, p.mlflow.experiment, parent_run_id, trial_id)
    if existing is not None:
        reopen(uri, existing.info.run_id)
        return existing.info.run_id
    run_id = start_run(uri, p, family=family, model=model, options=options, stage="tune-trial",
                       run_name=f"{family}-{trial_id}", parent_run_id=parent_run_id,
                       extra_tags={"trial_id": trial_id, "ray_experiment": ray_experiment, "tune.phase": phase,
                                   "train_split": splits["train_split"], "eval_split": splits["val_split"]})
    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, params=[Param(f"hp.{k}", v) for k, v in hp.items()] + [Param("tune.seed", str(seed))],
                          metrics=[Metric(f"model/{k}", float(v), now, 0) for k, v in cost.items()])
    return run_id


def mark_asha_stop(uri: str, experiment: str, parent_run_id: str, trial_id: str, epoch: int) -> None:
    """Tag the trial's child run with the epoch ASHA stopped it at (a resumed tune still knows it)."""
    run = find_trial_run(uri, experiment, parent_run_id, trial_id)
    if run is not None:
        client(uri).set_tag(run.info.run_id, "tune.asha_stopped_at", str(epoch))


def close_trial(uri: str, run, status: str) -> None:
    """Tag an ended trial's run with its outcome (completed / early_stopped / error) and close it: a
    trial ASHA stops is killed, so its run may still be RUNNING (or FAILED by the kill)."""
    c = client(uri)
    c.set_tag(run.info.run_id, "tune.status", status)
    c.set_tag(run.info.run_id, "early_stopped", str(status == "early_stopped").lower())
    want = "FAILED" if status == "error" else "FINISHED"
    if run.info.status != want:
        c.set_terminated(run.info.run_id, status=want)


def kill_if_running(uri: str, run_id: str) -> None:
    """An interrupted trial's run: KILLED (RUNNING again when the tune resumes)."""
    c = client(uri)
    if c.get_run(run_id).info.status == "RUNNING":
        c.set_terminated(run_id, status="KILLED")


def log_result(uri: str, parent_run_id: str, *, metrics: dict, params: dict[str, str], tags: dict[str, str],
               files: list[Path], plots: list[Path]) -> None:
    """The tune's result on its parent run: metrics at step 0, params, tags, files and plots/."""
    c = client(uri)
    now = int(time.time() * 1000)
    c.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                params=[Param(k, v) for k, v in params.items()], tags=[])
    for k, v in tags.items():
        c.set_tag(parent_run_id, k, v)
    for f in files:
        c.log_artifact(parent_run_id, str(f))
    for f in plots:
        c.log_artifact(parent_run_id, str(f), artifact_path="plots")
