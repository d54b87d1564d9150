"""The MLflow reads and writes of `segpipe report` and `segpipe predict`: open the store, the train
runs and their logged models / confusion matrices, the Model Registry (register the best run,
resolve ``models:/`` URIs) and the tune runs (trials, best configs).

Returns plain data (:class:`pipeline.tracking.records.RunRecord`, dicts); the choices made
on it (which runs are averaged, whether a family was tuned) live in ``pipeline.reporting``.
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException

from pipeline.config import Params
from pipeline.data.voc import NUM_CLASSES
from pipeline.errors import UserError
from pipeline.tracking.records import NOT_A_SETTING, RunRecord, parse_param
from pipeline.tracking.runs import search_runs
from pipeline.tracking.store import client, preflight, resolve_tracking_uri


def store_exists(uri: str) -> bool:
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def open_store(p: Params):
    """(client, tracking uri, experiment) or a UserError saying what to run first."""
    uri = resolve_tracking_uri(p.mlflow.tracking_uri)
    if not store_exists(uri):
        raise UserError(f"no MLflow store at {uri[len('sqlite:///'):]}: train first "
                        "(`dvc repro` or `segpipe train --family <name>`) (mlflow.tracking_uri)")
    preflight(p)  # unreachable / refused / unauthorised / read-only: one error line within seconds
    c = client(uri)
    try:
        exp = c.get_experiment_by_name(p.mlflow.experiment)
    except Exception as exc:  # unreachable server, broken database
        raise UserError(f"cannot read the MLflow store {uri}: {exc.__class__.__name__}: {str(exc)[:200]} "
                        "(mlflow.tracking_uri)") from None
    if exp is None:
        raise UserError(f"no experiment {p.mlflow.experiment!r} in {uri}: train first (mlflow.experiment)")
    return c, uri, exp


def train_runs(c, experiment_id: str) -> list:
    """Every FINISHED train run of the experiment, newest first."""
    return search_runs(c, experiment_id, "tags.stage = 'train' and attributes.status = 'FINISHED'")


def logged_models(c, experiment_id: str) -> dict[str, str]:
    """source run id -> model id of its (latest) READY logged model."""
    out: dict[str, tuple[int, str]] = {}
    token = None
    while True:
        page = c.search_logged_models(experiment_ids=[experiment_id], page_token=token, max_results=100)
        for m in page:
            if str(m.status).endswith("READY") and m.source_run_id:
                if m.source_run_id not in out or m.creation_timestamp > out[m.source_run_id][0]:
                    out[m.source_run_id] = (m.creation_timestamp, m.model_id)
        token = page.token
        if not token:
            return {k: v[1] for k, v in out.items()}


def read_confusion(c, run_id: str) -> np.ndarray | None:
    """The run's confusion_matrix.csv artifact (NUM_CLASSES x NUM_CLASSES), None when absent or malformed."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(run_id, "confusion_matrix.csv", tmp)
        except Exception:
            return None
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
    try:
        cm = np.array([[float(v) for v in row[1:]] for row in rows])
    except ValueError:
        return None
    return cm if cm.shape == (NUM_CLASSES, NUM_CLASSES) else None


def load_records(c, experiment_id: str, chosen: dict, p: Params) -> list[tuple[str, list[RunRecord]]]:
    """(family, its records) per family of params.yaml with chosen runs (in params order), with each
    run's val mIoU and img/s histories, confusion matrix and logged model id."""
    models = logged_models(c, experiment_id)
    groups = []
    for fam in p.families:
        recs = []
        for seed in p.seeds:
            r = chosen.get((fam, seed))
            if r is None:
                continue
            rec = RunRecord(run_id=r.info.run_id, family=fam, model=r.data.tags["model"], seed=seed,
                            start_ms=r.info.start_time or 0, end_ms=r.info.end_time or r.info.start_time or 0,
                            metrics=dict(r.data.metrics), params=dict(r.data.params), tags=dict(r.data.tags),
                            model_id=models.get(r.info.run_id))
            for key in ("val/mIoU", "train/img_per_s"):
                rec.history[key] = sorted((m.step, m.value) for m in c.get_metric_history(rec.run_id, key))
            rec.cm = read_confusion(c, rec.run_id)
            recs.append(rec)
        if recs:
            groups.append((fam, recs))
    return groups


def register_best(c, group) -> dict | None:
    """segpipe-<family> -> a version from the best run's logged model, alias `best` on it (a
    version already aliased `best` for the same run is kept, so re-running adds no version)."""
    best = group.best
    if not best.model_id:
        return None
    name = f"segpipe-{group.family}"
    try:
        current = c.get_model_version_by_alias(name, "best")
        if current.run_id == best.run_id:
            return {"name": name, "version": int(current.version), "alias": "best", "run_id": best.run_id, "new": False}
    except MlflowException:
        pass
    try:
        c.create_registered_model(name, description=f"Best {group.family} run by val mIoU, registered by `segpipe report`.",
                                  tags={"family": group.family})
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "ALREADY_EXISTS" not in str(exc.error_code):
            raise
    miou = f"{best.metric('mIoU') or float('nan'):.4f}"
    mv = c.create_model_version(name, source=f"models:/{best.model_id}", run_id=best.run_id, model_id=best.model_id,
                                tags={"family": group.family, "model": best.model, "seed": str(best.seed),
                                      "val_mIoU": miou},
                                description=f"{best.model}, seed {best.seed}, val mIoU {miou}")
    c.set_registered_model_alias(name, "best", mv.version)
    return {"name": name, "version": int(mv.version), "alias": "best", "run_id": best.run_id, "new": True}


def tune_trials(c, experiment_id: str, p: Params) -> list[dict]:
    """Finished Ray Tune trials (stage=tune-trial) of the configured families: label, run id, the
    tune (parent run) it belongs to, the split it was selected on, the config of the knobs that vary
    between trials of a family, final val mIoU."""
    runs = [r for r in search_runs(c, experiment_id, "tags.stage = 'tune-trial'")
            if r.data.tags.get("family") in p.families and "val/mIoU" in r.data.metrics]
    trials = []
    for fam in p.families:
        rs = [r for r in runs if r.data.tags["family"] == fam]
        if not rs:
            continue
        keys = set().union(*(r.data.params for r in rs))
        tuned = sorted(k for k in keys if k.startswith("hp."))  # what `segpipe tune` searched, when it says so
        varying = [k for k in (tuned or sorted(keys)) if not k.startswith(NOT_A_SETTING)
                   and len({r.data.params.get(k) for r in rs}) > 1]
        for r in rs:
            trials.append({"label": fam, "run_id": r.info.run_id, "mIoU": r.data.metrics["val/mIoU"],
                           "status": r.info.status, "eval_split": r.data.tags.get("eval_split", "val"),
                           "parent_run_id": r.data.tags.get("mlflow.parentRunId"),
                           "config": {k: parse_param(r.data.params[k]) for k in varying if k in r.data.params}})
    return trials


def tune_best_configs(c, experiment_id: str, p: Params) -> dict[str, list[dict]]:
    """family -> its finished tunes, newest first: {run_id, best: {key: value as logged}} from the tune
    parent run's ``best.*`` params (``model`` and every searched key; what `segpipe tune --apply`
    writes into params.yaml). Tunes without a best config (interrupted, failed) are skipped."""
    out: dict[str, list[dict]] = {}
    for r in search_runs(c, experiment_id, "tags.stage = 'tune'"):
        fam = r.data.tags.get("family")
        best = {k[len("best."):]: v for k, v in r.data.params.items() if k.startswith("best.")}
        if fam in p.families and "model" in best:
            text = r.data.tags.get("ablation")
            out.setdefault(fam, []).append({"run_id": r.info.run_id, "best": best,
                                            "ablation": json.loads(text) if text else None})
    return out


def run_eval_size(uri: str, run_id: str | None) -> int | None:
    """train.eval_size of an MLflow run, when the store and the run are there."""
    if not run_id or not store_exists(uri):
        return None
    try:
        v = client(uri).get_run(run_id).data.params.get("train.eval_size")
        return int(v) if v else None
    except Exception:
        return None


def registry_run_id(uri: str, model_uri: str) -> str | None:
    """The run behind models:/<name>@<alias>, models:/<name>/<version> or models:/<logged model id>."""
    c = client(uri)
    m = re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri)
    try:
        if m:
            return c.get_model_version_by_alias(m.group(1), m.group(2)).run_id
        m = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
        if m:
            return c.get_model_version(m.group(1), m.group(2)).run_id
        m = re.fullmatch(r"models:/(m-[0-9a-f]+)", model_uri)
        if m:
            return c.get_logged_model(m.group(1)).source_run_id
    except Exception:
        return None
    return None
