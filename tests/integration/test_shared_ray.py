"""One local Ray for a whole quickstart (issue 14): `system.shared_local_ray` starts it, the child
processes it runs (DVC's stages) join it through RAY_ADDRESS instead of starting their own, and it
is gone when the block ends. The driver runs in its own process (this one may hold the session's Ray)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline import system
from tests.support.paths import ROOT

CHILD = ("import ray; from pipeline.system import ray_init, ray_is_local\n"
         "owned = ray_init()\n"
         "print(owned, ray.get_runtime_context().gcs_address, ray_is_local(), flush=True)\n")

DRIVER = f"""
import json, os, subprocess, sys
from pipeline.system import shared_local_ray
base = dict(os.environ)  # as quickstart: the stages' env is taken before its Ray starts
with shared_local_ray(num_cpus=1) as env:
    outs = [subprocess.run([sys.executable, "-c", {CHILD!r}], env=dict(base, **env), capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
print("RESULT", json.dumps({{"address": env["RAY_ADDRESS"], "children": [[o.returncode, o.stdout, o.stderr[-800:]] for o in outs]}}))
"""


@pytest.mark.slow
def test_stages_join_the_one_local_ray_and_it_stops_after():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", system.SHARED_ENV)}
    proc = subprocess.run([sys.executable, "-c", DRIVER], env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    address = res["address"]
    for rc, out, err in res["children"]:
        assert rc == 0, err
        owned, joined, local = out.split()[-3:]
        assert (owned, joined, local) == ("False", address, "True")  # joined ours, did not start its own
    host, port = address.rsplit(":", 1)
    with pytest.raises(OSError):  # the head (its GCS) stopped with the block
        socket.create_connection((host, int(port)), timeout=5).close()


def test_ray_is_local_names_a_cluster_only_when_it_is_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(system.SHARED_ENV, raising=False)
    assert system.ray_is_local("")
    assert not system.ray_is_local("10.0.0.5:6379")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    assert not system.ray_is_local("")
    monkeypatch.setenv(system.SHARED_ENV, "127.0.0.1:6380")
    assert system.ray_is_local("")


BLOCKED = """
import json, time, psutil, ray
from pipeline.system import ray_init, shutdown_ray
ray_init(num_cpus=1)
ray_procs = [c.pid for c in psutil.Process().children(recursive=True)]
ray.shutdown = lambda *a, **k: time.sleep(3600)  # what Ray's shutdown does when its GCS RPC never returns
t = time.monotonic()
ok = shutdown_ray(timeout=3)
print("RESULT", json.dumps({"ok": ok, "took": time.monotonic() - t, "procs": ray_procs,
                            "left": [p for p in ray_procs if psutil.pid_exists(p)
                                     and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]}))
"""


def test_a_ray_shutdown_that_never_returns_is_bounded():
    """ray.shutdown can block forever in an RPC to its GCS (ray-project/ray#44836): the driver stops
    the local Ray it started by PID after the timeout and goes on, instead of hanging a quickstart's
    end (or the suite's teardown)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", BLOCKED], env=env, capture_output=True, text=True, timeout=180)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, out.stderr[-2000:]
    res = json.loads(line[len("RESULT "):])
    assert res["ok"] is False and res["took"] < 20, res
    assert res["procs"] and not res["left"], res
