"""Running on a Ray cluster, for real: a Ray head started here (own temp dir and ports), an MLflow
tracking server on 127.0.0.1 with proxied artifacts, `ray job submit` of a tiny 2-worker training,
a job with bad params, the runs read back over the server's REST API. Everything is stopped by
PID. Also: the cluster definitions parse and run commands the CLI has."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from tests.conftest import ROOT
from tests.support import tiny_overrides, _free_port, _wait_http, _stop_tree, _env, _rest

BIN = Path(sys.executable).parent


_SHELL_OPS = {">", ">>", "&", "&&", "|", "||", ";", "2>&1"}


def _segpipe_args(command: str) -> list[str] | None:
    """The arguments of the `segpipe ...` call inside a shell command line, if any."""
    tokens = shlex.split(command, comments=True)
    if "segpipe" not in tokens:
        return None
    args = tokens[tokens.index("segpipe") + 1:]
    return args[: next((i for i, t in enumerate(args) if t in _SHELL_OPS), len(args))]


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "rayjob.yaml", "runtime_env.yaml"])
def test_cluster_definitions_parse_and_use_real_commands(name):
    path = ROOT / "cluster" / name
    doc = yaml.safe_load(path.read_text())
    parser = build_parser()
    if name == "rayjob.yaml":
        assert doc["kind"] == "RayJob"
        args = _segpipe_args(doc["spec"]["entrypoint"])
        assert args and args[0] == "train"
        parser.parse_args(args)  # the stage and every flag exist (argparse raises on an unknown one)
        assert doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        # the tracking server by an address every pod reaches, not an env var (it would win over -S)
        assert "MLFLOW_TRACKING_URI" not in yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
        assert "mlflow.tracking_uri=http://mlflow:5000" in args and "--all" in args
    elif name == "ray-cluster.yaml":
        assert {"head", "gpu_worker"} <= set(doc["available_node_types"])
        cmds = [a for a in map(_segpipe_args, doc["setup_commands"] + doc["head_start_ray_commands"]) if a]
        assert [c[0] for c in cmds] == ["mlflow-server"]
        for c in cmds:
            parser.parse_args(c)
        assert "pip install" in " ".join(doc["setup_commands"]) and doc["docker"]["image"]
    else:
        for d in ("data/", ".venv/", "mlruns/"):
            assert d in doc["excludes"]
        assert doc["env_vars"]["PYTHONPATH"] == "."
        # no tracking URI: jobs name the server by the head's address (-S mlflow.tracking_uri=...);
        # an env var here would win over that, and 127.0.0.1 is each node itself
        assert "MLFLOW_TRACKING_URI" not in doc["env_vars"]


# ------------------------------------------------------------------------------ real services










@pytest.fixture(scope="module")
def ray_head():
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's unix sockets live under it
    ports = {k: _free_port() for k in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                        "object-manager-port", "dashboard-agent-listen-port",
                                        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")}
    base = 20000 + (os.getpid() % 200) * 100
    log = tmp / "head.log"
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--temp-dir={tmp}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
           f"--min-worker-port={base}", f"--max-worker-port={base + 99}",
           *(f"--{k}={v}" for k, v in ports.items())]
    proc = subprocess.Popen(cmd, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{ports['dashboard-port']}"
        _wait_http(address + "/api/version", 120, proc, log)
        yield {"address": address, "tmp": tmp}
    finally:
        _stop_tree(proc)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = d / "server.log"
    cmd = [str(BIN / "segpipe"), "mlflow-server", "-p", str(ROOT / "params.yaml"), "--port", str(port),
           "--artifacts-destination", str(d / "artifacts"),
           "-S", f"mlflow.tracking_uri=sqlite:///{d / 'mlflow.db'}"]
    proc = subprocess.Popen(cmd, cwd=d, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/health", 120, proc, log)
        yield {"url": url, "dir": d}
    finally:
        _stop_tree(proc)




def _submit(ray_head, runtime_env: Path, args: list[str]) -> str:
    job_id = f"segpipe-test-{int(time.time() * 1000)}"
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--no-wait",
                           "--submission-id", job_id, "--working-dir", str(ROOT), "--runtime-env", str(runtime_env),
                           "--", *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return job_id


def _wait_job(ray_head, job_id: str, timeout: float = 600) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head["address"])
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", ray_head["address"], job_id],
                          env=_env(), capture_output=True, text=True, timeout=120).stdout
    return str(status), logs


@pytest.mark.slow
def test_ray_job_submit_tune_and_bad_params(ray_head, mlflow_server, synthetic_shards, tmp_path, monkeypatch):
    """`ray job submit` of a tune (its parent and trial runs land in the tracking server) and of a
    training with bad params (the job FAILED with the one `error:` line, no traceback), both at
    once on a fresh server. A good `segpipe train` job: test_readme_cluster.py (`train --all`) and
    the two-host test below (SPREAD, basic auth)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # for the JobSubmissionClient in this process
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    env["env_vars"]["MLFLOW_TRACKING_URI"] = mlflow_server["url"]
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump(env))
    work = tmp_path / "work"
    sets = sum((["-S", o] for o in tiny_overrides(synthetic_shards, work) + ["train.sample_images=1"]), [])

    bad = _submit(ray_head, runtime_env, ["segpipe", "train", "--family", "unet", *sets, "-S", "train.batch_size=-3"])
    tune = _submit(ray_head, runtime_env, [
        "segpipe", "tune", *sets, "-S", "tune.families=[unet]", "-S", "tune.space.unet={upsample: {grid: [transposed]}}",
        "-S", "tune.max_epochs=1", "-S", "tune.grace_period=1", "-S", "tune.num_workers=1",
        "-S", "tune.cpus_per_worker=0.9", "-S", "tune.max_concurrent_trials=1"])
    bad_status, bad_logs = _wait_job(ray_head, bad, timeout=120)
    assert bad_status == "FAILED"
    assert "error: bad params" in bad_logs and "train.batch_size" in bad_logs and "Traceback" not in bad_logs

    tune_status, tune_logs = _wait_job(ray_head, tune)
    assert tune_status == "SUCCEEDED", tune_logs[-4000:]
    assert "[unet] best:" in tune_logs, tune_logs[-3000:]

    # the runs, read back from the tracking server's REST API
    exp = _rest(mlflow_server["url"], "/api/2.0/mlflow/experiments/get-by-name?experiment_name=segpipe")["experiment"]
    runs = _rest(mlflow_server["url"], "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs}
    assert sorted(t.get("stage") for t in tags.values()) == ["tune", "tune-trial"]  # one trial: the parent/child shape
    parent = next(i for i, t in tags.items() if t["stage"] == "tune")
    trial = next(r for r in runs if tags[r["info"]["run_id"]]["stage"] == "tune-trial")
    assert tags[trial["info"]["run_id"]]["mlflow.parentRunId"] == parent
    assert trial["info"]["status"] == "FINISHED" and tags[trial["info"]["run_id"]]["family"] == "unet"
    assert any(m["key"] == "val/mIoU" for m in trial["data"]["metrics"])
    # the parent's files went through the server's proxy into its artifact destination
    arts = _rest(mlflow_server["url"], f"/api/2.0/mlflow/artifacts/list?run_id={parent}")
    assert {"trials.csv", "best_config.json"} <= {f["path"] for f in arts.get("files", [])}
    assert list((mlflow_server["dir"] / "artifacts").rglob("trials.csv"))


# ------------------------------------------------------------------------------ two hosts


NS_HOST, NS_PEER = "10.213.7.1", "10.213.7.2"  # a /30 of our own: host side, namespace side
PASSWORD = "segpipe-cluster-test-pw"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: a second "host" at NS_PEER that
    reaches this one at NS_HOST. Skipped with the kernel's answer when it refuses (no root,
    no CAP_NET_ADMIN, no netns support). Deleted in the end, whatever happened."""
    import shutil

    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to make a network namespace")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, peer_if = f"segpipe13-{tag}", f"sp13h{tag}", f"sp13n{tag}"
    made = _ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"the kernel refused a network namespace: {made.stderr.strip()}")
    try:
        for args in (["link", "add", host_if, "type", "veth", "peer", "name", peer_if],
                     ["link", "set", peer_if, "netns", ns],
                     ["addr", "add", f"{NS_HOST}/30", "dev", host_if], ["link", "set", host_if, "up"],
                     ["-n", ns, "addr", "add", f"{NS_PEER}/30", "dev", peer_if], ["-n", ns, "link", "set", peer_if, "up"],
                     ["-n", ns, "link", "set", "lo", "up"]):
            r = _ip(*args, check=False)
            if r.returncode != 0:
                pytest.skip(f"the kernel refused `ip {' '.join(args)}`: {r.stderr.strip()}")
        ping = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c",
                               f"import socket; socket.create_connection(('{NS_HOST}', 9), timeout=3)"],
                              capture_output=True, text=True, timeout=30)
        if "timed out" in ping.stderr or "unreachable" in ping.stderr.lower():
            pytest.skip(f"no traffic over the veth pair: {ping.stderr.strip()[-200:]}")
        yield ns
    finally:
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)


def _ray_ports(avoid: range) -> dict:
    """Free ports for Ray's components, none inside `avoid` (the worker port range)."""
    def port() -> int:
        while (p := _free_port()) in avoid:
            pass
        return p

    return {k: port() for k in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                      "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                      "runtime-env-agent-port", "metrics-export-port")}


def _basic(path: str, url: str, body: dict | None = None, host: str | None = None) -> tuple[int, dict]:
    import base64

    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()})
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


@pytest.mark.slow
def test_two_hosts_spread_training_with_an_authenticated_server(netns, synthetic_shards, tmp_path, monkeypatch):
    """Ray head + MLflow server (basic auth) bound to the host side of a veth pair, a second Ray
    node inside the namespace joining by that address, `ray job submit` of a 2-worker training
    placed one worker per node (SPREAD) that logs to the server by that address with credentials."""
    import psutil

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    procs: list[subprocess.Popen] = []
    head_tmp = Path(tempfile.mkdtemp(prefix="rh2", dir="/tmp"))
    node_tmp = Path(tempfile.mkdtemp(prefix="rn2", dir="/tmp"))
    try:
        # the tracking server, auth on, on the host's veth address
        mport = _free_port()
        (tmp_path / "pw").write_text(PASSWORD + "\n")
        mlog = tmp_path / "mlflow.log"
        server = subprocess.Popen(
            [str(BIN / "segpipe"), "mlflow-server", "-p", str(ROOT / "params.yaml"), "--host", NS_HOST,
             "--port", str(mport), "--auth", "--auth-password-file", str(tmp_path / "pw"),
             "--artifacts-destination", str(tmp_path / "artifacts"), "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
            cwd=tmp_path, env=_env(), stdout=open(mlog, "w"), stderr=subprocess.STDOUT)
        procs.append(server)
        murl = f"http://{NS_HOST}:{mport}"
        # the Ray head on the same address
        base = 20000 + (os.getpid() % 200) * 100
        ports = _ray_ports(range(base, base + 100))
        hlog = head_tmp / "head.log"
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=1", f"--node-ip-address={NS_HOST}",
             f"--temp-dir={head_tmp}", "--include-dashboard=true", f"--dashboard-host={NS_HOST}", "--disable-usage-stats",
             f"--min-worker-port={base}", f"--max-worker-port={base + 99}", *(f"--{k}={v}" for k, v in ports.items())],
            env=_env(), stdout=open(hlog, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(head)
        ray_address = f"http://{NS_HOST}:{ports['dashboard-port']}"
        _wait_http(ray_address + "/api/version", 120, head, hlog)
        _wait_http(murl + "/health", 120, server, mlog)
        # the second "host": a Ray node inside the namespace, joining by the head's veth address
        nlog = node_tmp / "node.log"
        node = subprocess.Popen(
            ["ip", "netns", "exec", netns, str(BIN / "ray"), "start", f"--address={NS_HOST}:{ports['port']}", "--block",
             "--num-cpus=1", f"--node-ip-address={NS_PEER}", f"--temp-dir={node_tmp}", "--disable-usage-stats"],
            env=_env(), stdout=open(nlog, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(node)
        import ray.util.state

        deadline = time.time() + 120
        while time.time() < deadline:
            if node.poll() is not None:
                raise RuntimeError(f"the namespace's Ray node exited:\n{nlog.read_text()[-3000:]}")
            alive = {n.node_ip for n in ray.util.state.list_nodes(address=ray_address) if n.state == "ALIVE"}
            if alive == {NS_HOST, NS_PEER}:
                break
            time.sleep(1)
        assert alive == {NS_HOST, NS_PEER}, alive

        # the server: unauthenticated 401, a name it is not (Host: localhost from a peer) 403
        assert _basic("/api/2.0/mlflow/experiments/search?max_results=1", murl)[0] == 200
        try:
            urllib.request.urlopen(murl + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
            raise AssertionError("unauthenticated request accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        assert _basic("/api/2.0/mlflow/experiments/search?max_results=1", murl, host="localhost")[0] == 403
        peer = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c",
                               "import urllib.request, sys\n"
                               "try: urllib.request.urlopen(sys.argv[1], timeout=10)\n"
                               "except urllib.error.HTTPError as e: print(e.code)",
                               murl + "/api/2.0/mlflow/experiments/search?max_results=1"],
                              capture_output=True, text=True, timeout=60)
        assert peer.stdout.strip() == "401", peer.stdout + peer.stderr  # the peer reaches it, and must log in

        # the job: 2 workers, SPREAD, logging to the server by its address with credentials
        env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
        env["env_vars"].update({"MLFLOW_TRACKING_URI": murl, "MLFLOW_TRACKING_USERNAME": "admin",
                                "MLFLOW_TRACKING_PASSWORD": PASSWORD})
        runtime_env = tmp_path / "runtime_env.yaml"
        runtime_env.write_text(yaml.safe_dump(env))
        work = tmp_path / "work"
        sets = sum((["-S", o] for o in tiny_overrides(synthetic_shards, work)
                    + ["train.sample_images=1", "ray.placement_strategy=SPREAD", "train.max_failures=0"]), [])
        job = _submit({"address": ray_address}, runtime_env, ["segpipe", "train", "--family", "unet", *sets])
        status, logs = _wait_job({"address": ray_address}, job, timeout=400)
        assert status == "SUCCEEDED", logs[-4000:]
        assert "[unet] done: val mIoU" in logs

        # one worker per node: the nodes of the job's Ray Train worker actors, as Ray's state API knows them
        node_ips = {n.node_id: n.node_ip for n in ray.util.state.list_nodes(address=ray_address)}
        workers = ray.util.state.list_actors(address=ray_address, filters=[("class_name", "=", "RayTrainWorker")],
                                             limit=1000)
        nodes = {node_ips[a.node_id] for a in workers}
        assert len(workers) == 2 and nodes == {NS_HOST, NS_PEER}, (nodes, workers)
        # checkpoints on the storage path both hosts share
        assert list((work / "ray").rglob("checkpoint_*/state.pt"))
        # runs and artifacts, read back through the server with credentials
        code, exp = _basic("/api/2.0/mlflow/experiments/get-by-name?experiment_name=segpipe", murl)
        assert code == 200
        code, found = _basic("/api/2.0/mlflow/runs/search", murl, {"experiment_ids": [exp["experiment"]["experiment_id"]]})
        run = found["runs"][0]
        assert run["info"]["status"] == "FINISHED" and any(m["key"] == "val/mIoU" for m in run["data"]["metrics"])
        code, arts = _basic(f"/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}", murl)
        assert {"confusion_matrix.png", "predictions.png"} <= {f["path"] for f in arts.get("files", [])}
        assert list((tmp_path / "artifacts").rglob("confusion_matrix.png"))
    finally:
        for proc in reversed(procs):
            _stop_tree(proc)
        for d in (head_tmp, node_tmp):
            import shutil

            shutil.rmtree(d, ignore_errors=True)
        leftover = [p for p in psutil.process_iter(["cmdline"]) if str(node_tmp) in " ".join(p.info["cmdline"] or [])]
        assert not leftover, leftover
