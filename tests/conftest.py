import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TAR = ROOT / "assets" / "voc-mini.tar"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `segpipe ...` as a user would (a fresh process), capturing output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one `error:` line naming what is wrong, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """A copy of the committed params.yaml in a temp dir (tests never touch the repo's)."""
    dst = tmp_path / "params.yaml"
    dst.write_text((ROOT / "params.yaml").read_text())
    return dst


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path -> its bytes (to show nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (2 CPUs) with its own temp dir, shut down (its own processes) at the end."""
    import tempfile

    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


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
