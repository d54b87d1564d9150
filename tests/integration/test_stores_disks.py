"""Issue 15, item 5: the tracking store is checked before Ray starts (unreachable, refused, silent,
unauthorised, read-only), a short server outage is survived by the bounded retries, and a full /
read-only / not-a-directory data.dir is one error line with earlier outputs intact."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.cli import assert_user_error, run_cli
from tests.support.files import mounted, no_debris, params, tree_snapshot
from tests.support.procs import free_port


def _train(params_file, d, uri, *extra):
    return run_cli("train", "-q", "-p", str(params_file), "-S", f"data.dir={d}", "-S", f"mlflow.tracking_uri={uri}",
                   "-S", f"ray.storage_path={d.parent / 'ray_results'}", "-S", "train.model=unet",
                   "-S", "train.model_options={base_channels: 4}", *extra, timeout=120)


def _timed(fn, *a):
    t = time.monotonic()
    out = fn(*a)
    return out, time.monotonic() - t


@pytest.mark.parametrize("which", ["port9", "closed_port"])
def test_refused_store_fails_fast(tmp_path, params_file, sample_dir, which):
    uri = "http://127.0.0.1:9" if which == "port9" else f"http://127.0.0.1:{free_port()}"
    before = tree_snapshot(tmp_path)
    proc, took = _timed(_train, params_file, sample_dir, uri)
    assert_user_error(proc, uri, "refused the connection", "(mlflow.tracking_uri)")
    assert took < 30  # the check itself is ~1 s; the rest is interpreter start-up on a shared CPU
    assert tree_snapshot(tmp_path) == before and not (tmp_path / "ray_results").exists()


def test_silent_store_times_out_within_seconds(tmp_path, params_file, sample_dir, silent_server):
    proc, took = _timed(_train, params_file, sample_dir, silent_server, "-S", "mlflow.preflight_timeout_s=3")
    assert_user_error(proc, silent_server, "did not answer within 3 s", "(mlflow.tracking_uri)")
    assert took < 40


def test_unauthorised_store(tmp_path, params_file, sample_dir, deny_server):
    proc = _train(params_file, sample_dir, deny_server)
    assert_user_error(proc, deny_server, "HTTP 401", "MLFLOW_TRACKING_TOKEN", "(mlflow.tracking_uri)")


def test_env_uri_is_named_as_such(tmp_path, params_file, sample_dir):
    env_uri = f"http://127.0.0.1:{free_port()}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = env_uri
    try:
        proc = _train(params_file, sample_dir, "sqlite:///unused.db")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
    assert_user_error(proc, env_uri, "(MLFLOW_TRACKING_URI)")


@pytest.mark.parametrize("stage", ["train", "report"])
def test_read_only_sqlite_store(tmp_path, params_file, sample_dir, stage):
    store = tmp_path / "store"
    store.mkdir()
    con = sqlite3.connect(store / "mlflow.db")
    con.execute("create table t (x)")
    con.commit()
    con.close()
    before = tree_snapshot(store)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with mounted("ro", store):
        if stage == "train":
            proc = _train(params_file, sample_dir, uri)
        else:
            proc = run_cli("report", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}",
                           "-S", f"mlflow.tracking_uri={uri}", "-S", f"train.reports_dir={tmp_path / 'reports'}")
    assert_user_error(proc, uri, "not writable", "(mlflow.tracking_uri)")
    assert tree_snapshot(store) == before


class _Gate:
    """A loopback TCP forwarder in front of the real MLflow server: close() makes the server's
    address refuse connections (an outage), open() brings it back, on the same port."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = free_port()
        self.sock = None
        self.live = []  # forwarded connections: an outage cuts them too (no keep-alive through it)

    def open(self):
        import socket

        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def close(self):
        import socket

        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread; the port now refuses
        except OSError:
            pass
        self.sock.close()
        for x in self.live:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.live = []

    def _accept(self, s):
        import socket

        while True:
            try:
                client, _ = s.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.live += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(2)
                except OSError:
                    pass


def test_bounded_retries_survive_a_short_outage(tmp_path, params_file, monkeypatch):
    """The tracking server's address refuses connections for 6 s while a stage logs a metric:
    MLflow's retries, bounded by mlflow.http_* (0, 4, 8, ... s), carry the request over the gap.
    With retries off the same outage loses the request."""
    from pipeline import tracking
    from pipeline.stages.ui import server_command

    port = free_port()
    p = params(params_file, tmp_path / "D")
    server = subprocess.Popen(server_command(f"sqlite:///{tmp_path / 'm.db'}", port), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, **tracking.server_env(p)})  # as segpipe ui starts it
    gate = _Gate(port)
    url = f"http://127.0.0.1:{gate.port}"
    for env in tracking.HTTP_RETRY_ENV:
        monkeypatch.delenv(env, raising=False)
    set_env = tracking.bounded_http_retries(p)
    assert set_env == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        gate.open()
        c = tracking.client(url)
        run_id = c.create_run(c.create_experiment("outage")).info.run_id
        gate.close()
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # without retries: lost at once
        with pytest.raises(Exception):
            tracking.log_metrics(url, run_id, {"m": 1.0}, step=0)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", set_env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
        reopen = threading.Timer(6.0, gate.open)
        reopen.start()
        t = time.monotonic()
        tracking.log_metrics(url, run_id, {"m": 2.0}, step=1)  # blocks through the outage
        took = time.monotonic() - t
        reopen.join()
        assert 6 < took < 60
        assert [m.value for m in c.get_metric_history(run_id, "m")] == [2.0]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its workers, by group
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# --------------------------------------------------------------------------- data.dir failures


def _fill(mount: Path, leave: int) -> None:
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "wb") as f:
        f.write(bytes(max(0, free - leave)))


@pytest.mark.parametrize("stage", ["fetch", "preprocess"])
def test_full_data_dir(tmp_path, params_file, stage):
    with mounted("tmpfs", tmp_path / "m", size="6m") as m:
        d = m / "D"
        p = params(params_file, d, "data.source=sample", "data.workers=1")
        from pipeline.data.sources import fetch
        from pipeline.data.shards import preprocess

        fetch(p, progress=False)
        preprocess(p, progress=False)
        _fill(m, 64 << 10)
        before = tree_snapshot(d)
        proc = run_cli(stage, "-q", "-p", str(params_file), "-S", f"data.dir={d}", "-S", "data.source=sample",
                       "-S", "data.workers=1")
        assert_user_error(proc, str(d), "No space left on device", "(data.dir)")
        assert ".raw-new" not in proc.stderr and ".tmp-" not in proc.stderr
        assert tree_snapshot(d) == before
        no_debris(d)


@pytest.mark.parametrize("stage", ["fetch", "preprocess"])
def test_read_only_data_dir(tmp_path, params_file, sample_dir, stage):
    before = tree_snapshot(sample_dir)
    with mounted("ro", sample_dir):
        proc = run_cli(stage, "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", "data.source=sample")
    assert_user_error(proc, str(sample_dir), "Read-only file system", "(data.dir)")
    assert tree_snapshot(sample_dir) == before


@pytest.mark.parametrize("stage", ["fetch", "preprocess"])
def test_data_dir_is_a_file(tmp_path, params_file, stage):
    f = tmp_path / "notadir"
    f.write_text("keep me\n")
    proc = run_cli(stage, "-q", "-p", str(params_file), "-S", f"data.dir={f}", "-S", "data.source=sample")
    assert_user_error(proc, str(f), "is a file, not a directory", "(data.dir)")
    assert f.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notadir", "params.yaml"]


def test_the_first_jobs_on_a_fresh_store_share_one_experiment(tmp_path):
    """Two jobs start on a fresh tracking store at once (a train and a tune `ray job submit`): both
    look the experiment up, find nothing, create it; the store refuses the second create
    (RESOURCE_ALREADY_EXISTS), and that job must use the first one's experiment, not fail."""
    from pipeline import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)

    class LookedBeforeTheOtherCreated:  # the losing process: its lookup ran before the winner's create
        def __init__(self):
            self.looked = False

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                return None
            return c.get_experiment_by_name(name)

        def __getattr__(self, name):
            return getattr(c, name)

    winner = tracking.experiment_id(c, "segpipe")
    assert tracking.experiment_id(LookedBeforeTheOtherCreated(), "segpipe") == winner
    assert [e.name for e in c.search_experiments()].count("segpipe") == 1


@pytest.mark.parametrize("lock", ["reader in a transaction", "writer"])
def test_a_locked_sqlite_store_is_one_line_before_anything_runs(tmp_path, params_file, sample_dir, lock):
    """Another process holds a lock on the db (an open sqlite3 shell): the store's preflight makes a
    committed write, so even a reader's SHARED lock is found before Ray, within mlflow.preflight_timeout_s,
    not as tracebacks in the middle of the run with the run left RUNNING."""
    store = tmp_path / "store"
    store.mkdir()
    db = store / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("create table t (x)")
    con.execute("insert into t values (1)")
    con.commit()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"con = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        f"con.execute({'BEGIN' if lock.startswith('reader') else 'BEGIN IMMEDIATE'!r})\n"
        "con.execute('select * from t').fetchall()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_snapshot(store)
        proc, took = _timed(_train, params_file, sample_dir, f"sqlite:///{db}", "-S", "mlflow.preflight_timeout_s=2")
    finally:
        holder.kill()
        holder.wait()
    assert_user_error(proc, "is locked by another process", "(mlflow.tracking_uri)")
    assert took < 30, took
    assert tree_snapshot(store) == before
