"""The tracking store: URI resolution, clients, the pre-flight check, HTTP retry bounds, experiments and
moving a store with its checkout (the failed-login throttle of `segpipe mlflow-server --auth` is
tracking/throttle.py)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from pipeline.config import Params


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

    # MLflow logs every SQL error of a sqlite store with its traceback before raising it; segpipe
    # reports a store failure as one line naming the store and the run (runs.store_failure)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    return MlflowClient(tracking_uri=uri)


# MLflow 3 opens an experiment in its GenAI view unless it is tagged as model development
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(c, name: str) -> str:
    """Get or create; with a sqlite store the artifacts go to mlruns/ beside the database file
    (absolute), not to the current directory of whichever process logs first. The experiment
    carries EXPERIMENT_KIND (also set on experiments made before the tag existed). Two processes
    creating it at once (the first jobs on a fresh tracking server): the loser's create fails
    with RESOURCE_ALREADY_EXISTS and it uses the winner's experiment."""
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp:
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:
                c.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    uri = c.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or not (exp := c.get_experiment_by_name(name)):
            raise
        return exp.experiment_id


# columns that hold artifact locations (MLflow 3 schema); a table or column a store lacks is skipped
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "source"),
                     ("model_versions", "storage_location"))


def rehome_store(uri: str, timeout: float = 10.0) -> int:
    """Let a sqlite store move with its checkout. MLflow stores artifact locations absolute (it
    resolves a relative one when the experiment is created), so experiment_id() roots them at
    <db dir>/mlruns; when the store is found elsewhere (the checkout was moved or copied), every
    location under the old <...>/mlruns root is rewritten to this db's mlruns/ (experiments, runs,
    logged models, model versions: artifacts and models:/ URIs resolve again). Locations not under a
    .../mlruns root (s3:, another directory) are left alone. Returns the rows changed."""
    import sqlite3

    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return 0
    path = Path(uri[len("sqlite:///"):])
    if not path.is_file():
        return 0
    new_dir = (path.resolve().parent / "mlruns")
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout)
    except sqlite3.Error:
        return 0
    changed = 0
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "experiments" not in tables:
            return 0
        roots = set()
        for (loc,) in con.execute("SELECT artifact_location FROM experiments"):
            if not loc or "/mlruns" not in loc:
                continue
            cut = loc.rfind("/mlruns")
            rest = loc[cut + len("/mlruns"):]
            if rest and not rest.startswith("/"):
                continue
            old = loc[:cut + len("/mlruns")]
            if old.startswith("file://"):
                new = new_dir.as_uri()
            elif old.startswith("/"):
                new = str(new_dir)
            else:
                continue  # s3:, mlflow-artifacts:, ...: not a local root
            if old != new:
                roots.add((old, new))
        if not roots:
            return 0
        with con:  # one transaction
            for table, col in _LOCATION_COLUMNS:
                if table not in tables or col not in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}:
                    continue
                for old, new in roots:
                    cur = con.execute(
                        f"UPDATE {table} SET {col} = ? || substr({col}, ?) "
                        f"WHERE {col} = ? OR substr({col}, 1, ?) = ?",
                        (new, len(old) + 1, old, len(old) + 1, old + "/"))
                    changed += cur.rowcount
    except sqlite3.Error:
        return changed
    finally:
        con.close()
    return changed


# ----------------------------------------------------------------------------------- preflight
# MLflow's HTTP retry variables and the mlflow.* knob each is set from (bounded_http_retries)
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "http_max_retries",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "http_backoff_factor",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "http_timeout_s"}


def bounded_http_retries(p: Params) -> dict[str, str]:
    """Export MLflow's retry settings from mlflow.http_* (an env var the user set wins). They are
    read by MLflow at each request, here and in the Ray workers this process starts."""
    out = {}
    for env, key in HTTP_RETRY_ENV.items():
        if env not in os.environ:
            os.environ[env] = str(getattr(p.mlflow, key))
        out[env] = os.environ[env]
    return out


SERVER_JOBS_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def server_env(p: Params) -> dict[str, str]:
    """The environment of an `mlflow server` that segpipe starts (ui, mlflow-server): MLflow's job
    runner for its GenAI features (scorers, trace rollups: 8 huey consumer processes, ~19 CPU-s to
    start and ~0.25 core while idle, measured on 2 cores) only when mlflow.server_jobs is on or
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION says so; segpipe's runs use none of it."""
    return {SERVER_JOBS_ENV: os.environ.get(SERVER_JOBS_ENV, "true" if p.mlflow.server_jobs else "false")}


def _store_error(uri: str, reason: str, hint: str = "") -> Exception:
    from pipeline.errors import UserError

    where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "mlflow.tracking_uri"
    return UserError(f"the MLflow tracking store {uri} {reason}{hint} ({where})")


def _check_writable_dir(uri: str, d: Path, what: str) -> None:
    import tempfile

    if not d.exists():
        raise _store_error(uri, f"is unusable: {what} {d} does not exist", ": create it or fix the path")
    if not d.is_dir():
        raise _store_error(uri, f"is unusable: {what} {d} is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".segpipe-preflight-", dir=d)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise _store_error(uri, f"is not writable: cannot create a file in {d} ({exc.strerror or exc})",
                           ": fix permissions / free space, or point it elsewhere") from None


def _preflight_sqlite(uri: str, timeout: float) -> None:
    import sqlite3

    path = Path(uri[len("sqlite:///"):])
    d = path.parent
    while not d.exists() and d != d.parent:  # MLflow creates missing directories: check where it would
        d = d.parent
    _check_writable_dir(uri, d, "the directory")
    if not path.exists():
        return  # MLflow creates it on first use, in a writable directory
    if not path.is_file():
        raise _store_error(uri, f"is unusable: {path} is not a file")
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
        try:
            # a real write, committed: the commit needs the EXCLUSIVE lock, so another process that
            # holds any lock on the db (even a reader in an open transaction) is found now, within
            # `timeout`, not as "database is locked" errors in the middle of a run. user_version is
            # SQLite's header field for applications; MLflow does not use it, and it is rewritten as is.
            con.execute("BEGIN IMMEDIATE")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            con.execute(f"PRAGMA user_version = {int(version)}")
            con.execute("COMMIT")
        finally:
            con.close()
    except sqlite3.Error as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise _store_error(uri, f"is locked by another process ({exc}, waited {timeout:g} s)",
                               ": wait for it to finish or stop it (an open sqlite3 shell, a second "
                               "`mlflow ui` writing), then re-run") from None
        raise _store_error(uri, f"is not writable ({exc})", ": fix permissions or the file system, or "
                                                            "point it elsewhere") from None
    rehome_store(uri, timeout)  # a moved checkout: artifact locations follow the db


def _preflight_http(uri: str, experiment: str, timeout: float) -> None:
    import requests

    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    def classify(text: str) -> Exception:
        low = text.lower()
        if "refused" in low:
            return _store_error(uri, "refused the connection", ": start it (`segpipe mlflow-server`) or fix the URI")
        if "read timed out" in low or "readtimeout" in low:
            return _store_error(uri, f"accepted the connection but did not answer within {timeout:g} s",
                                ": check the server")
        if "timed out" in low or "timeout" in low:
            return _store_error(uri, f"did not answer within {timeout:g} s", ": is the server running? fix the URI")
        if "name or service not known" in low or "nodename nor servname" in low or "resolve" in low:
            return _store_error(uri, "names a host that does not resolve", ": fix the URI")
        return _store_error(uri, "is unreachable", ": start it (`segpipe mlflow-server`) or fix the URI")

    try:
        resp = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/get-by-name", "GET",
                            max_retries=0, backoff_factor=0, backoff_jitter=0, timeout=timeout,
                            raise_on_status=False, params={"experiment_name": experiment})
    except requests.exceptions.RequestException as exc:
        raise classify(f"{type(exc).__name__} {exc}") from None
    except Exception as exc:  # MlflowException wrapping the requests error, or a bad URI
        raise classify(f"{type(exc).__name__} {getattr(exc, 'message', exc)}") from None
    if resp.status_code in (401, 403):
        raise _store_error(uri, f"refused our credentials (HTTP {resp.status_code})",
                           ": set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    if resp.status_code == 404:
        try:
            code = resp.json().get("error_code")
        except ValueError:
            code = None
        if code == "RESOURCE_DOES_NOT_EXIST":
            return  # a server without our experiment yet: it is created on first use
        raise _store_error(uri, "is not an MLflow tracking server (HTTP 404 on its REST API)")
    if resp.status_code != 200:
        raise _store_error(uri, f"answered HTTP {resp.status_code}", ": check the server's log")


def preflight(p: Params, timeout: float | None = None) -> str:
    """Check the tracking store before anything long starts (train, tune, report): reachable,
    authorised and writable, within a few seconds, else one UserError naming mlflow.tracking_uri.
    Also exports the bounded retry settings (bounded_http_retries). Returns the resolved URI."""
    uri = resolve_tracking_uri(p.mlflow.tracking_uri)
    timeout = p.mlflow.preflight_timeout_s if timeout is None else timeout
    bounded_http_retries(p)
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith("sqlite:") else ""
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
            return uri
        _preflight_sqlite(uri, timeout)
    elif scheme in ("http", "https"):
        _preflight_http(uri, p.mlflow.experiment, timeout)
    elif scheme in ("", "file"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        path = Path(url2pathname(urlparse(uri).path)) if scheme == "file" else Path(uri)
        path = path.resolve()
        while not path.exists() and path != path.parent:
            path = path.parent
        _check_writable_dir(uri, path, "the directory")
    return uri
