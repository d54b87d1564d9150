"""One local Ray for a whole quickstart (issue 14): `system.shared_local_ray` starts it, the child
processes it runs (DVC's stages) join it through RAY_ADDRESS instead of starting their own, and it
is gone when the block ends."""

import os
import subprocess
import sys

import pytest

from pipeline import system
from tests.conftest import ROOT

CHILD = ("import ray; from pipeline.system import ray_init, ray_is_local\n"
         "owned = ray_init()\n"
         "print(owned, ray.get_runtime_context().gcs_address, ray_is_local(), flush=True)\n")


@pytest.mark.slow
def test_stages_join_the_one_local_ray_and_it_stops_after():
    import ray

    if ray.is_initialized():
        pytest.skip("this process already holds a Ray (the session's)")
    with system.shared_local_ray(num_cpus=1) as env:
        address = env["RAY_ADDRESS"]
        child = dict(os.environ, **env, PYTHONPATH=str(ROOT))
        outs = [subprocess.run([sys.executable, "-c", CHILD], env=child, capture_output=True, text=True, timeout=120)
                for _ in range(2)]
        for res in outs:
            assert res.returncode == 0, res.stderr[-800:]
            owned, joined, local = res.stdout.split()[-3:]
            assert (owned, joined, local) == ("False", address, "True")  # joined ours, did not start one
    assert not ray.is_initialized()
    gone = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r})"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert gone.returncode != 0  # the head stopped with the block


def test_ray_is_local_names_a_cluster_only_when_it_is_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(system.SHARED_ENV, raising=False)
    assert system.ray_is_local("")
    assert not system.ray_is_local("10.0.0.5:6379")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    assert not system.ray_is_local("")
    monkeypatch.setenv(system.SHARED_ENV, "127.0.0.1:6380")
    assert system.ray_is_local("")
