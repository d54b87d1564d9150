"""A second "host" for the cluster tests: a network namespace joined to this one by a veth pair,
Ray head ports, `ray job submit` / its outcome, and REST calls to an authenticated MLflow server."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.paths import BIN
from tests.support.procs import free_port, tool_env

NS_HOST, NS_PEER = "10.213.7.1", "10.213.7.2"  # a /30 of our own: host side, namespace side
PASSWORD = "segpipe-cluster-test-pw"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _remove_stale_namespaces() -> None:
    """A test process killed before its clean-up leaves its namespace and host-side veth holding
    NS_HOST: every later pair with that address then drops packets. Remove those of dead pids."""
    import re

    listed = _ip("netns", "list", check=False).stdout
    for tag in re.findall(r"^segpipe13-(\d+)", listed, re.M):
        if not os.path.exists(f"/proc/{tag}"):
            _ip("link", "del", f"sp13h{tag}", check=False)
            _ip("netns", "del", f"segpipe13-{tag}", check=False)


@contextlib.contextmanager
def network_namespace():
    """A network namespace joined to this one by a veth pair: a second "host" at NS_PEER that
    reaches this one at NS_HOST. Skipped with the kernel's answer when it refuses (no root,
    no CAP_NET_ADMIN, no netns support). Deleted in the end, whatever happened."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to make a network namespace")
    _remove_stale_namespaces()
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
        for _ in range(5):  # a fresh veth pair on a loaded machine may drop the first packets (ARP, link up)
            ping = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                                   f"import socket; socket.create_connection(('{NS_HOST}', 9), timeout=3)"],
                                  capture_output=True, text=True, timeout=30)
            if "timed out" not in ping.stderr and "unreachable" not in ping.stderr.lower():
                break
            time.sleep(1)
        else:
            pytest.skip(f"no traffic over the veth pair: {ping.stderr.strip()[-200:]}")
        yield ns
    finally:
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)


def ray_ports(avoid: range) -> dict:
    """Free ports for a Ray head's components, none inside `avoid` (the worker port range)."""
    def port() -> int:
        while (p := free_port()) in avoid:
            pass
        return p

    return {k: port() for k in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                "runtime-env-agent-port", "metrics-export-port")}


def basic(path: str, url: str, body: dict | None = None, host: str | None = None) -> tuple[int, dict]:
    """An MLflow REST call as the admin user (PASSWORD); (status, JSON body)."""
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


def submit_job(address: str, working_dir: Path, runtime_env: Path, args: list[str]) -> str:
    """`ray job submit --no-wait` of `args`; returns the submission id."""
    job_id = f"segpipe-test-{int(time.time() * 1000)}"
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait",
                           "--submission-id", job_id, "--working-dir", str(working_dir), "--runtime-env", str(runtime_env),
                           "--", *args], env=tool_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return job_id


def wait_job(address: str, job_id: str, timeout: float = 600) -> tuple[str, str]:
    """(final status, logs) of a submitted job."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, job_id],
                          env=tool_env(), capture_output=True, text=True, timeout=120).stdout
    return str(status), logs
