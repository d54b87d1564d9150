"""The suite's shared fixtures and pytest hooks. Helpers (functions, constants, classes) live in
tests/support/ and are imported from there."""

import http.server
import os
import socket
import threading
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support")  # its asserts report like a test module's

from pipeline.data.shards import preprocess  # noqa: E402  (imports after the rewrite hook)
from pipeline.data.sources import fetch  # noqa: E402
from tests.support.files import params  # noqa: E402
from tests.support.paths import ROOT  # noqa: E402
from tests.support.servers import DenyHandler  # noqa: E402


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """A copy of the committed params.yaml in a temp dir (tests never touch the repo's)."""
    dst = tmp_path / "params.yaml"
    dst.write_text((ROOT / "params.yaml").read_text())
    return dst


def pytest_configure(config):
    """Before any test process starts a Ray: make sure this user's Ray token exists. This Ray turns
    token authentication on by default and writes ~/.ray/auth_token when a head starts without one;
    two pytest-xdist workers starting their Rays at once on a fresh machine would each write their
    own, and one of them would then reject its own clients."""
    # Ray clients in this process read RAY_AUTH_MODE once (Ray's config is initialised on first
    # use and kept): token mode from the start, as every head here runs with token auth (the README
    # tells users to export it), so a cluster test's job client does not depend on which test
    # touched Ray first
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if hasattr(config, "workerinput"):  # an xdist worker: the controller did the token
        _share_the_cores(int(config.workerinput.get("workercount", 1)))
        return
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists():
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()


def _share_the_cores(workers: int) -> None:
    """An xdist worker's own torch work (in-process CLI runs, model tests) gets its share of the
    cores, not all of them: two workers (plus their Rays) on 2 cores, each with 2 OpenMP threads,
    spin-wait for a busy core (measured: a 40-step toy training beside one busy core took 13.6
    CPU-s with 2 threads, 7.3 with 1). Ray Train workers set their own (cpus_per_worker)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (2 CPUs) in this process with its own temp dir, started and stopped as a
    quickstart starts its one Ray (system.shared_local_ray); the environment a `segpipe` child
    process needs to join it is kept for `ray_join_env`."""
    import shutil
    import tempfile

    import ray

    from pipeline.system import shared_local_ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        with shared_local_ray(num_cpus=2, temp_dir=tmp) as env:
            _RAY_JOIN_ENV.update(env)
            yield ray
            _RAY_JOIN_ENV.clear()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_RAY_JOIN_ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def no_placement_group_left(request):
    """After every test on the session's Ray: no placement group may stay reserved (a leaked group
    holds CPUs of the 2-CPU Ray forever, and every later run on this xdist worker waits). The test
    that leaked fails its teardown, naming the groups, and they are removed so the rest can run.
    A child process's groups go when its Ray job ends: a few seconds' grace."""
    yield
    if "ray_local" not in request.fixturenames:
        return
    import time

    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not ray.is_initialized():
        return
    deadline = time.time() + 15
    while True:
        live = {k: v["bundles"] for k, v in placement_group_table().items() if v["state"] in ("CREATED", "PENDING")}
        if not live or time.time() > deadline:
            break
        time.sleep(0.5)
    for pg_hex in live:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
    assert not live, f"{request.node.nodeid} left placement groups reserved on the session's Ray: {live}"


@pytest.fixture
def ray_join_env(ray_local) -> dict[str, str]:
    """Environment variables that make a `segpipe` child process join the session's Ray (instead of
    starting its own: 10-20 s on 2 cores) the way a quickstart's DVC stages join its one Ray."""
    return dict(_RAY_JOIN_ENV)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """Tiny synthetic shards (16 train / 6 val, 64 px), made once per session."""
    from pipeline.config import load_params
    from pipeline.data.sources import fetch
    from pipeline.data.shards import preprocess

    d = tmp_path_factory.mktemp("syn") / "data"
    p = load_params(ROOT / "params.yaml", [f"data.dir={d}", "data.source=synthetic", "data.synthetic.train_count=16",
                                           "data.synthetic.val_count=6", "data.synthetic.size=64", "data.row_group_rows=5"])
    fetch(p, progress=False)
    preprocess(p, progress=False)
    return d


@pytest.fixture(autouse=True, scope="session")
def _segpipe_logging():
    """Stage functions called in-process log through the same handler `segpipe` sets up."""
    from pipeline.cli import setup_logging

    setup_logging()


# --- shared pieces of the reliability tests (issue 15) ---


@pytest.fixture
def sample_dir(tmp_path, params_file) -> Path:
    """<tmp>/D with raw/ and shards/ of the bundled 10-image sample (in-process: fast)."""
    d = tmp_path / "D"
    p = params(params_file, d, "data.source=sample", "data.workers=1")
    fetch(p, progress=False)
    preprocess(p, progress=False)
    return d


@pytest.fixture
def deny_server():
    """http://127.0.0.1:<port> answering every request with 401 (an auth proxy without our token)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DenyHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def silent_server():
    """http://127.0.0.1:<port> that accepts connections (kernel backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
