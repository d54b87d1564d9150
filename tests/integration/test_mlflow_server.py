"""`segpipe mlflow-server` security and `segpipe ui` / `mlflow-server` shutdown (issues 13, 15.7, 24.10),
against real servers on loopback started by the CLI as a user would: refused without auth on a
non-loopback address; with --auth every request needs credentials, a password file others can read
is refused and failed logins are throttled per client address (429); Host headers outside the
allowed names are rejected (on a loopback bind: every name but localhost / 127.0.0.1 / [::1]);
SIGHUP stops the whole process tree and frees the port."""

from __future__ import annotations

import base64
import http.client
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


def _get(port: int, auth: str | None = None, host: str | None = None, source: str = "127.0.0.1",
         headers: dict | None = None) -> tuple[int, str | None]:
    """(status, Retry-After) of an authenticated API request to 127.0.0.1:port sent from `source`
    (another loopback address is another client)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=(source, 0))
    h = dict(headers or {})
    if auth is not None:
        h["Authorization"] = "Basic " + base64.b64encode(f"admin:{auth}".encode()).decode()
    if host:
        h["Host"] = host
    try:
        conn.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", headers=h)
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("Retry-After")
    finally:
        conn.close()


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


def test_a_password_file_others_can_read_is_refused(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o644)
    proc = _start(["mlflow-server", "-p", str(ROOT / "params.yaml"), "--auth", "--auth-password-file", str(pw),
                   "--port", str(free_port()), "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path)
    try:  # a regression starts a server: the timeout ends the wait, stop_tree the server
        out, _ = proc.communicate(timeout=60)
    finally:
        stop_tree(proc)
    assert_user_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", out),
                      str(pw), "0644", "chmod 600", "--auth-password-file")
    assert PASSWORD not in out
    assert [p.name for p in tmp_path.iterdir()] == ["pw"]


@pytest.mark.parametrize("opts, needles", [
    (dict(auth=False, auth_max_failures=3), ["--auth-max-failures needs --auth"]),
    (dict(auth=False, auth_password_file="pw"), ["--auth-password-file needs --auth"]),
    (dict(auth=True, auth_max_failures=0), ["at least 1", "(--auth-max-failures)"]),
    (dict(auth=True, auth_failure_window=float("nan")), ["positive", "(--auth-failure-window)"]),
])
def test_bad_throttle_options_are_refused(opts, needles):
    import argparse

    from pipeline.errors import UserError
    from pipeline.stages.mlflow_server import _check_auth_args

    args = argparse.Namespace(**{"auth_password_file": None, "auth_max_failures": None, "auth_failure_window": None,
                                 **opts})
    with pytest.raises(UserError) as err:
        _check_auth_args(args)
    assert all(n in str(err.value) for n in needles), str(err.value)


def test_default_allowed_hosts():
    from pipeline.stages.mlflow_server import allowed_hosts

    remote = allowed_hosts("10.213.7.1", "head.example")
    assert {"10.213.7.1", "10.213.7.1:*", socket.gethostname(), "head.example", "head.example:*"} <= set(remote)
    # a server bound to a non-loopback address: no loopback client can reach it, so `Host: localhost`
    # (the DNS-rebinding escape hatch) and MLflow's private-IP patterns are not accepted
    assert not {"localhost", "localhost:*", "127.0.0.1", "10.*"} & set(remote)
    # a loopback bind: the loopback names only (not the hostname, not MLflow's private-IP patterns)
    assert set(allowed_hosts("127.0.0.1", "")) == {"localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*",
                                                   "[::1]", "[[]::1]:*"}


@pytest.mark.slow
def test_auth_server_hosts_and_sighup(tmp_path):
    port = free_port()
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "pw").chmod(0o600)
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
        # a loopback bind: only loopback clients reach it, so no other name is this server's
        assert _status(url, host=f"{socket.gethostname()}:{port}", auth=admin) == 403
        assert _status(url, host=f"seg-head.example:{port}") == 401
        # the server's command line carries no secret
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
        cmdlines = " ".join(" ".join(p.cmdline()) for p in children)
        assert "--app-name segpipe-basic-auth" in cmdlines and PASSWORD not in cmdlines
        assert "--no-proxy-headers" in cmdlines and "pipeline.tracking.throttle:throttled_auth_app" in cmdlines
        private = Path(children[0].environ()["MLFLOW_AUTH_CONFIG_PATH"]).parent  # the ini and the entry point
        assert private.is_dir() and (private.stat().st_mode & 0o077) == 0
        assert "_job_runner" not in cmdlines and "huey" not in cmdlines  # mlflow.server_jobs: false
        # clients authenticate with MLflow's standard variables
        env = dict(os.environ, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
        code = ("from mlflow.tracking import MlflowClient; import sys; c = MlflowClient(sys.argv[1]); "
                "print(c.create_experiment('auth-ok'))")
        ok = subprocess.run([sys.executable, "-c", code, f"http://127.0.0.1:{port}"], env=env, capture_output=True,
                            text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr[-2000:]
        _hup_and_check(proc, port)
        assert not private.exists()
    finally:  # on a failure: the whole tree (the server's uvicorn and MLflow's job runners too), by PID
        stop_tree(proc)


@pytest.mark.slow
def test_failed_logins_are_throttled_per_client(tmp_path):
    """3 failed logins from 127.0.0.1 within 20 s: 429 with Retry-After for new credentials (the right
    password included: no oracle), whatever X-Forwarded-For says; 127.0.0.2 is another client; a
    parallel burst from 127.0.0.3 gets 3 answers; after Retry-After, 127.0.0.1 is heard again. The
    server has no --allowed-hosts: foreign Host headers are refused on its loopback bind."""
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "pw").chmod(0o600)
    proc = _start(["mlflow-server", "-p", str(ROOT / "params.yaml"), "--port", str(port), "--auth",
                   "--auth-password-file", str(tmp_path / "pw"), "--auth-max-failures", "3",
                   "--auth-failure-window", "20", "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                  tmp_path)
    try:
        assert "3 failed logins within 20 s gets 429" in "".join(_wait_ready(proc))
        assert _get(port)[0] == 401  # no credentials: not a login (and the app's slow first request)
        assert [_get(port, f"wrong-password-{i}")[0] for i in range(3)] == [401] * 3
        status, retry = _get(port, "wrong-password-3")
        assert status == 429 and 1 <= int(retry) <= 20
        assert _get(port, PASSWORD)[0] == 429
        assert _get(port, "wrong-password-4", headers={"X-Forwarded-For": "198.51.100.1"})[0] == 429
        assert _get(port, "wrong-password-5", source="127.0.0.2")[0] == 401  # another client: its own count
        assert _get(port, PASSWORD, source="127.0.0.2")[0] == 200
        with ThreadPoolExecutor(12) as pool:
            burst = sorted(pool.map(lambda i: _get(port, f"guess-{i}", source="127.0.0.3")[0], range(12)))
        assert burst == [401] * 3 + [429] * 9, burst
        status, retry = _get(port, "wrong-password-6")
        assert status == 429
        time.sleep(int(retry) + 0.5)
        assert _get(port, "wrong-password-7")[0] == 401  # the window passed
        assert _get(port, PASSWORD)[0] == 200
        for host in ("10.1.2.3", "192.168.0.7:5000", "172.16.0.1", f"{socket.gethostname()}:{port}"):
            assert _get(port, PASSWORD, host=host)[0] == 403, host
        for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}"):
            assert _get(port, PASSWORD, host=host)[0] == 200, host
    finally:  # the whole tree, by PID
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
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
        assert [_status(url, host=h) for h in ("10.1.2.3", "192.168.0.7:5000", f"localhost:{port}")] == [403, 403, 200]
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
