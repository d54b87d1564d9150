"""The README's cluster recipe run as written: the blocks the README marks with
`<!-- tests/cluster/test_readme_cluster.py runs this block -->` (data and weights on shared storage,
the whole comparison as ONE `ray job submit`, the report) against a Ray head and a `segpipe
mlflow-server` this test starts, with only the substitutions declared in tests/unit/test_readme.py
(SUBSTITUTIONS / TINY_SETS). The parsing of every README command is tests/unit/test_readme.py.
"""

from __future__ import annotations
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
import pytest
from tests.conftest import ROOT
from tests.unit.test_readme import BIN, BLOCKS, runnable_script, substitutions, tiny_sets  # the helpers live beside the unit tests


@pytest.mark.slow
def test_the_cluster_recipe_runs_as_written(tmp_path):
    """A fresh copy of the checkout, a Ray head and an MLflow server started here; the README's
    marked blocks run by bash in the copy with the declared substitutions; one `ray job submit`
    trains every family x seed; the job SUCCEEDED and its runs are in the tracking server."""
    from tests.support import _env, _free_port, _rest, _stop_tree, _wait_http

    # a fresh checkout: the tracked (and untracked, not ignored) files, as `git clone` would give
    clone = tmp_path / "segpipe"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, clone / f)
    shared = tmp_path / "shared"
    shared.mkdir()

    env = dict(_env(), PYTHONPATH=str(clone))
    procs: list[subprocess.Popen] = []
    ray_tmp = Path(__import__("tempfile").mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's sockets
    try:
        # the Ray head (as tests/cluster/test_cluster.py's ray_head: own temp dir and ports)
        ports = {k: _free_port() for k in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                            "object-manager-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")}
        base = 20000 + ((os.getpid() + 97) % 200) * 100
        hlog = ray_tmp / "head.log"
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--temp-dir={ray_tmp}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
             f"--min-worker-port={base}", f"--max-worker-port={base + 99}", *(f"--{k}={v}" for k, v in ports.items())],
            env=env, stdout=open(hlog, "w"), stderr=subprocess.STDOUT, start_new_session=True))
        head = f"http://127.0.0.1:{ports['dashboard-port']}"
        # the tracking server: step 2's command, on 127.0.0.1 without --auth (test_cluster's
        # two-host test covers --auth), its store on the "shared" volume
        mport = _free_port()
        mlog = tmp_path / "mlflow.log"
        procs.append(subprocess.Popen(
            [str(BIN / "segpipe"), "mlflow-server", "--port", str(mport), "--artifacts-destination",
             str(shared / "mlartifacts"), "-S", f"mlflow.tracking_uri=sqlite:///{shared / 'mlflow.db'}"],
            cwd=clone, env=env, stdout=open(mlog, "w"), stderr=subprocess.STDOUT))
        mlflow = f"http://127.0.0.1:{mport}"
        _wait_http(head + "/api/version", 120, procs[0], hlog)
        _wait_http(mlflow + "/health", 120, procs[1], mlog)

        script = runnable_script([b for b in BLOCKS if b.marked], substitutions(head, mlflow, shared), tiny_sets())
        (tmp_path / "recipe.sh").write_text(script)
        t0 = time.time()
        proc = subprocess.run(["bash", str(tmp_path / "recipe.sh")], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=900)
        took = time.time() - t0
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{script}\n{out[-6000:]}"
        print(f"\nthe README's cluster recipe ran in {took:.0f}s")

        # one job, SUCCEEDED, that ran train --all
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(head).list_jobs()
        assert [(str(j.status), j.entrypoint.split()[:3]) for j in jobs] == [("SUCCEEDED", ["segpipe", "train", "--all"])]
        assert "[unet/seed0] done: val mIoU" in out and "[lraspp/seed0] done: val mIoU" in out, out[-4000:]
        assert "train --all: 2/2 runs finished" in out

        # the runs are in the tracking server, with their artifacts; the report read them from it
        exp = _rest(mlflow, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=segpipe")["experiment"]
        runs = _rest(mlflow, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
        assert sorted((t["family"], t["seed"], t["stage"]) for t in tags) == [("lraspp", "0", "train"), ("unet", "0", "train")]
        assert all(r["info"]["status"] == "FINISHED" and any(m["key"] == "val/mIoU" for m in r["data"]["metrics"])
                   for r in runs)
        assert list((shared / "mlartifacts").rglob("confusion_matrix.png"))
        # where the README put things: shards, checkpoints, DVC outputs and the report on /shared
        assert (shared / "data" / "shards" / "manifest.json").is_file()
        assert list((shared / "ray_results").rglob("checkpoint_*"))
        assert {p.name for p in (shared / "models").iterdir()} == {"unet-seed0.pt", "lraspp-seed0.pt"}
        comparison = json.loads((shared / "reports" / "comparison.json").read_text())
        assert "unet" in json.dumps(comparison) and "lraspp" in json.dumps(comparison)
    finally:
        for p in reversed(procs):
            _stop_tree(p)
        shutil.rmtree(ray_tmp, ignore_errors=True)
