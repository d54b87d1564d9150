"""The README's cluster recipe run as written, on two "hosts": the blocks the README marks with
`<!-- tests/cluster/test_readme_cluster.py runs this block -->` (data and weights on shared storage,
the whole comparison as ONE `ray job submit`, the report) against a Ray head and a `segpipe
mlflow-server --auth` bound to the host side of a veth pair (a non-loopback address, as HEAD is on a
cluster) and a second Ray node inside a network namespace that joins by that address, with only the
substitutions declared in tests/support/readme.py (substitutions / tiny_sets). The check of
every README command is tests/unit/test_readme.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.cluster import NS_HOST, NS_PEER, PASSWORD, basic, ray_ports, submit_job, wait_job
from tests.support.paths import BIN, ROOT
from tests.support.procs import free_port, stop_tree, tool_env, wait_http
from tests.support.readme import BLOCKS, runnable_script, substitutions, tiny_sets


def _fresh_checkout(clone: Path) -> None:
    """The tracked (and untracked, not ignored) files, as `git clone` would give."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, clone / f)


@pytest.mark.slow
def test_the_cluster_recipe_runs_as_written_on_two_hosts(netns, tmp_path, monkeypatch):
    """A fresh copy of the checkout; the tracking server (README step 2: --auth, bound to the host's
    veth address) and a Ray head there, a second Ray node in the namespace; the server refuses
    strangers; the README's marked blocks run by bash in the copy; one `ray job submit` trains every
    family x seed with each run's two workers on the two hosts (its all-reduces cross the veth),
    logging to the server by its address with credentials; the runs, artifacts, checkpoints, DVC
    outputs and report land where the README puts them. Then, on the same cluster, a training job
    with bad params (FAILED, one `error:` line) and a tune job (parent and trial runs, files through
    the server's proxy)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # for the state API / job client in this process (before Ray reads it)
    import psutil
    import ray.util.state

    clone = tmp_path / "segpipe"
    _fresh_checkout(clone)
    shared = tmp_path / "shared"
    shared.mkdir()
    env = dict(tool_env(), PYTHONPATH=str(clone))
    procs: list[subprocess.Popen] = []
    head_tmp = Path(tempfile.mkdtemp(prefix="rh2", dir="/tmp"))  # short: Ray's unix sockets live under it
    node_tmp = Path(tempfile.mkdtemp(prefix="rn2", dir="/tmp"))
    try:
        # the tracking server: README step 2, on the host's veth address, its store on /shared
        mport = free_port()
        (tmp_path / "pw").write_text(PASSWORD + "\n")
        (tmp_path / "pw").chmod(0o600)  # as docs/cluster.md makes it (umask 077): a readable one is refused
        mlog = tmp_path / "mlflow.log"
        server = subprocess.Popen(
            [str(BIN / "segpipe"), "mlflow-server", "--host", NS_HOST, "--port", str(mport), "--auth",
             "--auth-password-file", str(tmp_path / "pw"), "--artifacts-destination", str(shared / "mlartifacts"),
             "-S", f"mlflow.tracking_uri=sqlite:///{shared / 'mlflow.db'}"],
            cwd=clone, env=env, stdout=open(mlog, "w"), stderr=subprocess.STDOUT)
        procs.append(server)
        murl = f"http://{NS_HOST}:{mport}"
        # the Ray head on the same address
        base = 20000 + ((os.getpid() + 97) % 200) * 100
        ports = ray_ports(range(base, base + 100))
        hlog = head_tmp / "head.log"
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=1", f"--node-ip-address={NS_HOST}",
             f"--temp-dir={head_tmp}", "--include-dashboard=true", f"--dashboard-host={NS_HOST}", "--disable-usage-stats",
             f"--min-worker-port={base}", f"--max-worker-port={base + 99}", *(f"--{k}={v}" for k, v in ports.items())],
            env=env, stdout=open(hlog, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(head)
        ray_address = f"http://{NS_HOST}:{ports['dashboard-port']}"
        wait_http(ray_address + "/api/version", 120, head, hlog)
        # the second "host": a Ray node inside the namespace, joining by the head's veth address
        nlog = node_tmp / "node.log"
        node = subprocess.Popen(
            ["ip", "netns", "exec", netns, str(BIN / "ray"), "start", f"--address={NS_HOST}:{ports['port']}", "--block",
             "--num-cpus=1", f"--node-ip-address={NS_PEER}", f"--temp-dir={node_tmp}", "--disable-usage-stats"],
            env=env, stdout=open(nlog, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(node)
        wait_http(murl + "/health", 120, server, mlog)
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
        assert basic("/api/2.0/mlflow/experiments/search?max_results=1", murl)[0] == 200
        try:
            urllib.request.urlopen(murl + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
            raise AssertionError("unauthenticated request accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        assert basic("/api/2.0/mlflow/experiments/search?max_results=1", murl, host="localhost")[0] == 403
        peer = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c",
                               "import urllib.request, sys\n"
                               "try: urllib.request.urlopen(sys.argv[1], timeout=10)\n"
                               "except urllib.error.HTTPError as e: print(e.code)",
                               murl + "/api/2.0/mlflow/experiments/search?max_results=1"],
                              capture_output=True, text=True, timeout=60)
        assert peer.stdout.strip() == "401", peer.stdout + peer.stderr  # the peer reaches it, and must log in

        # README step 4 with --auth: "your own, uncommitted copy of the runtime env" with the credentials
        runtime_env = yaml.safe_load((clone / "cluster" / "runtime_env.yaml").read_text())
        runtime_env["env_vars"].update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD})
        (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
        script = runnable_script([b for b in BLOCKS if b.marked],
                                 substitutions(ray_address, murl, shared, tmp_path / "runtime_env.yaml"), tiny_sets())
        (tmp_path / "recipe.sh").write_text(script)
        t0 = time.time()
        # README step 5: the report's machine exports the two credential variables
        proc = subprocess.run(["bash", str(tmp_path / "recipe.sh")], cwd=clone, capture_output=True, text=True,
                              timeout=900, env=dict(env, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD))
        took = time.time() - t0
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{script}\n{out[-6000:]}"
        print(f"\nthe README's cluster recipe ran on two hosts in {took:.0f}s")

        # one job, SUCCEEDED, that ran train --all
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(ray_address).list_jobs()
        assert [(str(j.status), j.entrypoint.split()[:3]) for j in jobs] == [("SUCCEEDED", ["segpipe", "train", "--all"])]
        assert "[unet/seed0] done: val mIoU" in out and "[lraspp/seed0] done: val mIoU" in out, out[-4000:]
        assert "train --all: 2/2 runs finished" in out
        # each run's two workers on the two hosts (SPREAD), as Ray's state API knows them
        node_ips = {n.node_id: n.node_ip for n in ray.util.state.list_nodes(address=ray_address)}
        workers = ray.util.state.list_actors(address=ray_address, filters=[("class_name", "=", "RayTrainWorker")],
                                             detail=True, limit=1000)  # detail: a dead actor's placement group
        runs: dict[str, list[str]] = {}  # a run's workers share its placement group
        for a in workers:
            runs.setdefault(a.placement_group_id, []).append(node_ips[a.node_id])
        assert len(runs) == 2 and all(sorted(ips) == [NS_HOST, NS_PEER] for ips in runs.values()), runs

        # the runs and their artifacts, read back through the server with credentials
        code, exp = basic("/api/2.0/mlflow/experiments/get-by-name?experiment_name=segpipe", murl)
        assert code == 200
        code, found = basic("/api/2.0/mlflow/runs/search", murl, {"experiment_ids": [exp["experiment"]["experiment_id"]]})
        runs = found["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
        assert sorted((t["family"], t["seed"], t["stage"]) for t in tags) == [("lraspp", "0", "train"), ("unet", "0", "train")]
        assert all(r["info"]["status"] == "FINISHED" and any(m["key"] == "val/mIoU" for m in r["data"]["metrics"])
                   for r in runs)
        code, arts = basic(f"/api/2.0/mlflow/artifacts/list?run_id={runs[0]['info']['run_id']}", murl)
        assert {"confusion_matrix.png", "predictions.png"} <= {f["path"] for f in arts.get("files", [])}
        assert list((shared / "mlartifacts").rglob("confusion_matrix.png"))
        # where the README put things: shards, checkpoints (a path both hosts share), DVC outputs, the report
        assert (shared / "data" / "shards" / "manifest.json").is_file()
        assert list((shared / "ray_results").rglob("checkpoint_*/state.pt"))
        assert {p.name for p in (shared / "models").iterdir()} == {"unet-seed0.pt", "lraspp-seed0.pt"}
        comparison = json.loads((shared / "reports" / "comparison.json").read_text())
        assert "unet" in json.dumps(comparison) and "lraspp" in json.dumps(comparison)

        # more jobs on the same cluster, submitted as the README's: a training with bad params (the
        # job FAILED with the one `error:` line, no traceback) and a tune (its parent and trial runs
        # in the tracking server, its files through the server's proxy)
        sets = [f"mlflow.tracking_uri={murl}", f"data.dir={shared / 'data'}", f"ray.storage_path={shared / 'ray_results'}",
                f"train.reports_dir={shared / 'reports'}", *tiny_sets()]
        sets = sum((["-S", o] for o in sets), [])
        bad = submit_job(ray_address, clone, tmp_path / "runtime_env.yaml",
                         ["segpipe", "train", "--family", "unet", *sets, "-S", "train.batch_size=-3"])
        tune = submit_job(ray_address, clone, tmp_path / "runtime_env.yaml", [
            # a trial trains at the run's global batch (4 x the README's 4 workers) on 14 images: 2 x 4 fits
            "segpipe", "tune", *sets, "-S", "train.batch_size=2", "-S", "tune.families=[unet]", "-S", "tune.space.unet={upsample: {grid: [transposed]}}",
            "-S", "tune.max_epochs=1", "-S", "tune.grace_period=1", "-S", "tune.num_workers=1", "-S", "tune.seeds=1",
            "-S", "tune.cpus_per_worker=0.9", "-S", "tune.max_concurrent_trials=1"])
        bad_status, bad_logs = wait_job(ray_address, bad, timeout=120)
        assert bad_status == "FAILED"
        assert "error: bad params" in bad_logs and "train.batch_size" in bad_logs and "Traceback" not in bad_logs
        tune_status, tune_logs = wait_job(ray_address, tune)
        assert tune_status == "SUCCEEDED", tune_logs[-4000:]
        assert "[unet] adopted:" in tune_logs, tune_logs[-3000:]
        code, found = basic("/api/2.0/mlflow/runs/search", murl, {
            "experiment_ids": [exp["experiment"]["experiment_id"]], "filter": "tags.stage LIKE 'tune%'"})
        runs = found["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs}
        assert sorted(t.get("stage") for t in tags.values()) == ["tune", "tune-trial"]  # one trial: the parent/child shape
        parent = next(i for i, t in tags.items() if t["stage"] == "tune")
        trial = next(r for r in runs if tags[r["info"]["run_id"]]["stage"] == "tune-trial")
        assert tags[trial["info"]["run_id"]]["mlflow.parentRunId"] == parent
        assert trial["info"]["status"] == "FINISHED" and tags[trial["info"]["run_id"]]["family"] == "unet"
        assert any(m["key"] == "val/mIoU" for m in trial["data"]["metrics"])
        code, arts = basic(f"/api/2.0/mlflow/artifacts/list?run_id={parent}", murl)
        assert {"trials.csv", "best_config.json"} <= {f["path"] for f in arts.get("files", [])}
        assert list((shared / "mlartifacts").rglob("trials.csv"))
    finally:
        for p in reversed(procs):
            stop_tree(p)
        for d in (head_tmp, node_tmp):
            shutil.rmtree(d, ignore_errors=True)
        leftover = [p for p in psutil.process_iter(["cmdline"]) if str(node_tmp) in " ".join(p.info["cmdline"] or [])]
        assert not leftover, leftover
