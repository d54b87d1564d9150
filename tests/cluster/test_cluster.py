"""Running on a Ray cluster, for real: a Ray head started here (own temp dir and ports), an MLflow
tracking server on 127.0.0.1 with proxied artifacts, `ray job submit` of a tune and of a job with
bad params, the runs read back over the server's REST API. Everything is stopped by PID. Also: the
cluster definitions parse and run commands the CLI has. Two hosts (a network namespace), an
authenticated server and the README's `train --all` job: test_readme_cluster.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
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
