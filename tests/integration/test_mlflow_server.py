"""`segpipe mlflow-server` security and `segpipe ui` / `mlflow-server` shutdown (issues 13, 15.7),
against real servers on loopback started by the CLI as a user would: refused without auth on a
non-loopback address; with --auth every request needs credentials; Host headers outside the
allowed names are rejected; SIGHUP stops the whole process tree and frees the port."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.cli import assert_user_error, run_cli
from tests.support.paths import ROOT
from tests.support.procs import free_port, stop_tree

PASSWORD = "correct-horse-battery-staple"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of closed connections is no listener
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _status(url: str, host: str | None = None, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if host:
        req.add_header("Host", host)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:  # generous: the auth app's first request sets up its user store (slow on a loaded machine)
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_ready(proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    """The segpipe process's lines until it prints 'Ctrl-C to stop'."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"exited {proc.wait()}: {''.join(lines)}")
        lines.append(line)
        if "Ctrl-C to stop" in line:
            return lines
    raise AssertionError("not ready: " + "".join(lines))


def _hup_and_check(proc: subprocess.Popen, port: int) -> None:
    """SIGHUP the segpipe process: it exits, no process of its tree is left, the port is free."""
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) >= 2
    os.kill(proc.pid, signal.SIGHUP)
    try:
        proc.wait(timeout=60)
    finally:
        leftover = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in leftover:
            p.kill()
    assert proc.returncode == 0
    assert not leftover, leftover
    assert _port_free(port)


def test_non_loopback_without_auth_is_refused(tmp_path):
    proc = run_cli("mlflow-server", "-p", str(ROOT / "params.yaml"), "--host", "0.0.0.0", "--port", str(free_port()),
                   "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path,
                   fresh=True)  # a regression would start a server: a process the timeout stops
    assert_user_error(proc, "without authentication", "--auth", "--insecure")
    assert not list(tmp_path.iterdir())


def test_auth_without_a_password_is_refused(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_AUTH_")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "mlflow-server", "-p", str(ROOT / "params.yaml"),
                           "--auth", "--port", str(free_port()),
                           "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                          cwd=tmp_path, env=dict(env_free, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert_user_error(proc, "MLFLOW_AUTH_ADMIN_PASSWORD", "--auth-password-file")


def test_default_allowed_hosts():
    from pipeline.stages.mlflow_server import allowed_hosts

    remote = allowed_hosts("10.213.7.1", "head.example")
    assert {"10.213.7.1", "10.213.7.1:*", socket.gethostname(), "head.example", "head.example:*"} <= set(remote)
    # a server bound to a non-loopback address: no loopback client can reach it, so `Host: localhost`
    # (the DNS-rebinding escape hatch) and MLflow's private-IP patterns are not accepted
    assert not {"localhost", "localhost:*", "127.0.0.1", "10.*"} & set(remote)
    assert {"localhost", "localhost:*", "127.0.0.1:*"} <= set(allowed_hosts("127.0.0.1", ""))


@pytest.mark.slow
def test_auth_server_hosts_and_sighup(tmp_path):
    port = free_port()
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    proc = _start(["mlflow-server", "-p", str(ROOT / "params.yaml"), "--port", str(port), "--auth",
                   "--auth-password-file", str(tmp_path / "pw"), "--allowed-hosts", "seg-head.example",
                   "--artifacts-destination", str(tmp_path / "artifacts"),
                   "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path)
    try:
        out = "".join(_wait_ready(proc))
        assert "basic auth on" in out and PASSWORD not in out
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
        admin = ("admin", PASSWORD)
        assert _status(url, auth=admin) == 200
        assert _status(url) == 401                                     # no credentials
        assert _status(url, auth=("admin", "wrong-password-123")) == 401
        assert _status(url, host="evil.example", auth=admin) == 403     # a name this server is not
        assert _status(url, host=f"10.9.9.9:{port}", auth=admin) == 403  # MLflow's private-IP default dropped
        assert _status(url, host=f"seg-head.example:{port}", auth=admin) == 200  # --allowed-hosts
        assert _status(url, host=f"{socket.gethostname()}:{port}", auth=admin) == 200  # this machine's hostname
        assert _status(url, host=f"seg-head.example:{port}") == 401
        # the server's command line carries no secret
        import psutil

        cmdlines = " ".join(" ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(recursive=True))
        assert "basic-auth" in cmdlines and PASSWORD not in cmdlines
        assert "_job_runner" not in cmdlines and "huey" not in cmdlines  # mlflow.server_jobs: false
        # clients authenticate with MLflow's standard variables
        env = dict(os.environ, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
        code = ("from mlflow.tracking import MlflowClient; import sys; c = MlflowClient(sys.argv[1]); "
                "print(c.create_experiment('auth-ok'))")
        ok = subprocess.run([sys.executable, "-c", code, f"http://127.0.0.1:{port}"], env=env, capture_output=True,
                            text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr[-2000:]
        _hup_and_check(proc, port)
    finally:  # on a failure: the whole tree (the server's uvicorn and MLflow's job runners too), by PID
        stop_tree(proc)


@pytest.mark.slow
def test_ui_stops_its_whole_tree_on_sighup(tmp_path):
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # an existing store
    port = free_port()
    proc = _start(["ui", "-p", str(ROOT / "params.yaml"), "--port", str(port),
                   "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path)
    try:
        _wait_ready(proc)
        assert not _port_free(port)
        import psutil

        cmdlines = [" ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(recursive=True)]
        assert any(" server " in c for c in cmdlines) and not any("_job_runner" in c or "huey" in c for c in cmdlines), \
            cmdlines  # MLflow's GenAI job runner stays off (mlflow.server_jobs: false)
        _hup_and_check(proc, port)
    finally:  # on a failure: the whole tree (the server's uvicorn and MLflow's job runners too), by PID
        stop_tree(proc)


@pytest.mark.slow
def test_nohup_keeps_the_server_through_sighup(tmp_path):
    """Under `nohup` (SIGHUP ignored, as cluster/ray-cluster.yaml starts it) SIGHUP is not a stop
    request; SIGTERM still stops the whole tree."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    port = free_port()
    proc = subprocess.Popen(["nohup", sys.executable, "-m", "pipeline.cli", "ui", "-p", str(ROOT / "params.yaml"),
                             "--port", str(port), "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(proc)
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(3)
        assert proc.poll() is None and _status(f"http://127.0.0.1:{port}/health") == 200
        import psutil

        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive and _port_free(port)
    finally:  # on a failure: the whole tree, by PID
        stop_tree(proc)
