"""Serve the MLflow UI for the tracking store on 127.0.0.1.

Starts `mlflow server` on mlflow.tracking_uri bound to 127.0.0.1 (--port, default 5000), prints the
URL and runs until Ctrl-C, then stops the server. In the UI: experiment `segpipe`, filter tags.stage
= 'train', select runs, Compare (see README, MLflow UI).

Starts `mlflow server` (its own process group, so stopping it stops all of its workers), waits until
it answers, prints the URL and keeps running until Ctrl-C, SIGTERM or SIGHUP (terminal closed);
then stops the server's whole process tree (by process group and by PID) and exits 0.

The server accepts loopback Host headers only (LOOPBACK_HOSTS; MLflow's own default would also
accept every private address, e.g. `Host: 192.168.0.7`, which a DNS-rebinding page can send).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pipeline.config import Params
from pipeline.errors import UserError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# `mlflow server --allowed-hosts` of a loopback bind: the loopback names, with any port (fnmatch; IPv6 bracketed)
LOOPBACK_HOSTS = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[::1]", "[[]::1]:*"]


def add_arguments(parser) -> None:
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds to wait for the server to answer (default 120)")


def _port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the server will (uvicorn sets it): connections of a just-stopped server in TIME_WAIT do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def server_command(uri: str, port: int) -> list[str]:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]
    cmd += ["server", "--backend-store-uri", uri, "--host", HOST, "--port", str(port), "--workers", "1",
            "--allowed-hosts", ",".join(LOOPBACK_HOSTS)]
    if uri.startswith("sqlite:///"):  # experiments the UI creates keep their artifacts beside the database
        cmd += ["--default-artifact-root", (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()]
    return cmd


def _experiment_id(uri: str, name: str) -> str | None:
    """The experiment's id (tagged as model development on the way), or None when it does not exist."""
    from pipeline.tracking import client, experiment_id

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return None
    try:
        return experiment_id(c, name)
    except Exception:  # a read-only store still serves the UI: only the tag is missing then
        return exp.experiment_id


def _say(line: str) -> None:
    """A progress line; logging never raises when the terminal is gone (SIGHUP): stopping the server
    matters more than the line."""
    log.info(line)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the server's whole process tree: SIGTERM to its process group (it was started as its
    own session) and to every descendant found by PID (one that left the group too), then
    SIGKILL what is still there after `grace` seconds."""
    import psutil

    tree = _tree(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, tree = psutil.wait_procs(tree, timeout=grace if sig == signal.SIGTERM else 5.0)
        if not tree:
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run(p: Params, args) -> int:
    from pipeline.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(p.mlflow.tracking_uri)
    if uri.startswith(("http://", "https://", "databricks")):
        raise UserError(f"mlflow.tracking_uri is already a server: open {uri} in a browser (mlflow.tracking_uri)")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow store at {uri[len('sqlite:///'):]} yet: train first "
                        "(`dvc repro` or `segpipe train --family <name>`) (mlflow.tracking_uri)")
    if not 1 <= args.port <= 65535:
        raise UserError(f"port must be in 1..65535, got {args.port} (--port)")
    from pipeline.tracking import client, compare_filter, compare_url, rehome_store, server_env

    rehome_store(uri)  # a moved checkout: the UI serves artifacts from this db's mlruns/
    exp_id = _experiment_id(uri, p.mlflow.experiment)
    base = f"http://{HOST}:{args.port}"
    if exp_id:
        runs = compare_filter(client(uri), exp_id)
        compare = f"  compare the families ({runs}, chart view): {compare_url(base, exp_id, runs)}"
    else:
        compare = f"  experiment {p.mlflow.experiment!r} has no runs yet: train first"
    return serve(server_command(uri, args.port), host=HOST, port=args.port, timeout=args.timeout, what="MLflow UI",
                 env=server_env(p), banner=[f"  store {uri}, experiment {p.mlflow.experiment!r}", compare,
                         "  then tick the runs and click Compare (README: MLflow UI)"])


def serve(cmd: list[str], *, host: str, port: int, timeout: float, what: str, banner: list[str],
          env: dict | None = None) -> int:
    """Run an `mlflow server` command until Ctrl-C / SIGTERM / SIGHUP (a closed terminal): wait
    until it answers, print the URL and `banner`, then stop its whole process tree (also when it
    fails to start). `env`: extra environment for the server only (e.g. the auth settings)."""
    if not _port_free(port, host):
        raise UserError(f"port {port} on {host} is in use: pick another with --port N (--port)")
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    server_log = tempfile.NamedTemporaryFile(prefix="segpipe-mlflow-", suffix=".log", delete=False)
    # SIGTERM (`kill <pid>`) and SIGHUP (the terminal closed) stop the server like Ctrl-C does: the
    # server runs in its own session, so nothing else would stop it
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue  # started under `nohup` (as the cluster launcher does): keep serving after logout
        signal.signal(sig, _interrupt)
    proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        deadline = time.time() + timeout
        while not _answers(url):
            if proc.poll() is not None or time.time() > deadline:
                tail = Path(server_log.name).read_text(errors="replace").strip().splitlines()[-5:]
                why = "exited" if proc.poll() is not None else f"did not answer within {timeout:.0f}s"
                raise UserError(f"mlflow server {why}; its log ({server_log.name}) ends with: " + " | ".join(tail)) from None
            time.sleep(0.3)
        log.info(f"{what}: {url}")
        for line in banner:
            log.info(line)
        log.info(f"  server log {server_log.name}; server pid {proc.pid}; Ctrl-C to stop")
        while proc.poll() is None:
            time.sleep(0.5)
        raise UserError(f"mlflow server stopped on its own (exit {proc.returncode}); see {server_log.name}")
    except KeyboardInterrupt:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        _say(f"stopping the {what} ...")
        stop(proc)
        server_log.close()
        Path(server_log.name).unlink(missing_ok=True)
        _say("stopped")
        return 0
    finally:
        stop(proc)
        server_log.close()
