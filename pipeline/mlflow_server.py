"""`segpipe mlflow-server`: the tracking server a cluster logs to.

`mlflow server` over the backend store of mlflow.tracking_uri (sqlite, or PostgreSQL:
postgresql://user:pass@host/db) with `--serve-artifacts`: clients and Ray workers log over HTTP
and upload artifacts through the server's proxy into --artifacts-destination (a local/shared
path, or s3://, gs://), so no node needs the server's disk. Bound to 127.0.0.1 unless --host says
otherwise. Runs until Ctrl-C / SIGTERM, then stops the server by its process group id.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import Params
from pipeline.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 to serve a cluster's network)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--artifacts-destination", default="mlartifacts", metavar="DIR_OR_URI",
                        help="where proxied artifacts are stored (default ./mlartifacts; s3://... works)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds to wait for the server to answer (default 120)")


def server_command(store: str, host: str, port: int, artifacts: str) -> list[str]:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]
    dest = artifacts if "://" in artifacts else str(Path(artifacts).resolve())
    return cmd + ["server", "--backend-store-uri", store, "--serve-artifacts", "--artifacts-destination", dest,
                  "--host", host, "--port", str(port), "--workers", "1"]


def run(p: Params, args) -> int:
    from pipeline import ui

    store = p.mlflow.tracking_uri  # the backend store itself: MLFLOW_TRACKING_URI (the server's URL) does not apply
    if store.startswith(("http://", "https://", "databricks")):
        raise UserError(f"mlflow.tracking_uri must be a backend store (sqlite:///mlflow.db, postgresql://...), "
                        f"not a server URL: {store} (mlflow.tracking_uri)")
    if store.startswith("sqlite:///") and not store.startswith("sqlite:////"):
        store = "sqlite:///" + str(Path(store[len("sqlite:///"):]).resolve())
    if not 1 <= args.port <= 65535:
        raise UserError(f"port must be in 1..65535, got {args.port} (--port)")
    return ui.serve(server_command(store, args.host, args.port, args.artifacts_destination), host=args.host,
                    port=args.port, timeout=args.timeout, what="MLflow tracking server",
                    banner=[f"  backend store {store}, artifacts proxied to {args.artifacts_destination}",
                            f"  clients and Ray jobs: MLFLOW_TRACKING_URI=http://<this host>:{args.port}"])
