"""Runs: creation with the standard tags and flattened params, metrics, final status, the paginated
search every reader uses, the report tag, the UI's compare link and checkpoint artifacts."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from pipeline import system
from pipeline.config import Params, flatten
from pipeline.errors import UserError
from pipeline.tracking.store import client, experiment_id


class StoreFailed(UserError):
    """The tracking store failed in the middle of a run: one line naming the run, exit 1."""

    exit_code = 1


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:300]


def store_failure(exc: BaseException, uri: str, run_id: str) -> StoreFailed | None:
    """An exception that came from the tracking store during run `run_id` (MLflow, SQLAlchemy,
    sqlite3, or a Ray error whose text carries "database is locked"), as one line; else None."""
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if type(e).__module__.split(".")[0] in ("mlflow", "sqlalchemy", "sqlite3") or "database is locked" in str(e):
            what = "database is locked" if "database is locked" in str(e) else _first_line(e)
            return StoreFailed(f"the tracking store {uri} failed during run {run_id} ({what}): the run "
                               f"is ended FAILED if the store still answers, else left RUNNING "
                               f"(mlflow.tracking_uri)")
    return None


def search_runs(c, experiment_id: str, filter_string: str = "", order_by: list[str] | None = None) -> list:
    """Every run of the experiment matching ``filter_string`` (all pages; newest first by default).
    The one search of the codebase: train, tune, report and ui read runs through it."""
    out, token = [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                             order_by=order_by or ["attributes.start_time DESC"], page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def find_experiment(c, name: str):
    """The experiment called ``name`` or None (never creates it)."""
    return c.get_experiment_by_name(name)


def compare_filter(c, exp_id: str) -> str:
    """The runs the last `segpipe report` averaged (tag in_report=1), or every train run before any report."""
    in_report = "tags.in_report = '1'"
    return in_report if c.search_runs([exp_id], in_report, max_results=1) else "tags.stage = 'train'"


def compare_url(base: str, exp_id: str, search_filter: str) -> str:
    """The experiment's runs in the UI's model-training view, chart mode, filtered by `search_filter`:
    where a user compares the families (MLflow 3 needs workflowType=machine_learning)."""
    from urllib.parse import quote, urlencode

    query = urlencode({"workflowType": "machine_learning", "compareRunsMode": "CHART",
                       "searchFilter": search_filter}, quote_via=quote)
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?{query}"


def data_tags(data_dir) -> dict[str, str]:
    """Which train list the shards hold (manifest.json): data_train_list = train_aug (the recipe's
    10,582 images) or train (VOC's 1,464), data_train_images = its count. Empty without shards."""
    import json

    try:
        m = json.loads((Path(data_dir) / "shards" / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(m, dict) or "splits" not in m:
        return {}
    return {"data_train_list": str(m.get("train_list", "train")),
            "data_train_images": str(m["splits"].get("train", {}).get("count", 0))}


def start_run(uri: str, p: Params, *, family: str, model: str, options: dict, stage: str,
              run_name: str | None = None, parent_run_id: str | None = None, extra_tags: dict | None = None) -> str:
    """Create a run with the DESIGN.md tags and every param flattened; returns its id."""
    from mlflow.entities import Param

    c = client(uri)
    tags = {"family": family, "model": model, "seed": str(p.seed), "data_source": str(p.data.source),
            "git_commit": system.git_commit(), "stage": stage, "profile": p.profile, **(extra_tags or {})}
    tags.update(data_tags(p.data.dir))
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


IN_REPORT_TAG = "in_report"  # `segpipe report` keeps it on exactly the runs it averaged: UI filter tags.in_report = '1'


def mark_in_report(c, experiment_id: str, run_ids) -> None:
    """Tag the runs the report used with in_report=1 and take the tag off every other run of the
    experiment, so the UI filter `tags.in_report = '1'` selects exactly the report's runs."""
    keep = set(run_ids)
    page = None
    while True:
        res = c.search_runs([experiment_id], f"tags.{IN_REPORT_TAG} = '1'", max_results=1000, page_token=page)
        for r in res:
            if r.info.run_id not in keep:
                c.delete_tag(r.info.run_id, IN_REPORT_TAG)
        page = res.token
        if not page:
            break
    for rid in sorted(keep):
        c.set_tag(rid, IN_REPORT_TAG, "1")


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


@contextlib.contextmanager
def ending_run(uri: str, run_id: str, killed_by: tuple[type[BaseException], ...] = (KeyboardInterrupt,)):
    """Ends the run however the block ends: FINISHED when it completes, KILLED on ``killed_by``
    (Ctrl-C, SIGTERM), FAILED on anything else; the exception goes on."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except killed_by:
        status = "KILLED"
        raise
    finally:
        try:
            end_run(uri, run_id, status)
        except Exception as exc:  # the store itself is what failed: say so, name the run left behind
            raise StoreFailed(f"the tracking store {uri} could not end run {run_id} ({_first_line(exc)}): "
                              f"it is left RUNNING; end it in the MLflow UI once the store answers "
                              f"(mlflow.tracking_uri)") from None


# A train run logs its <family>-seed<N>.pt (state dict + model name/options) under this artifact
# path. predict and report load registered / logged models from it with torch.load(weights_only=True),
# never through mlflow.pytorch.load_model (a pickle of the whole module: loading it runs code).
CHECKPOINT_ARTIFACT = "checkpoint"


def download_checkpoint(uri: str, run_id: str, dst: Path) -> Path | None:
    """The run's checkpoint artifact, downloaded into dst; None when the run has none."""
    c = client(uri)
    try:
        names = [a.path for a in c.list_artifacts(run_id, CHECKPOINT_ARTIFACT) if a.path.endswith(".pt")]
    except Exception:
        return None
    if not names:
        return None
    return Path(c.download_artifacts(run_id, names[0], str(dst)))
