"""Issue 15, item 4: one writer per data dir."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.storage import writer_lock
from tests.support.cli import assert_user_error, run_cli
from tests.support.files import no_debris, tree_snapshot
from tests.support.paths import ROOT


@pytest.mark.parametrize("stage", ["fetch", "preprocess"])
def test_second_writer_fails_at_once(params_file, sample_dir, stage):
    before = tree_snapshot(sample_dir)
    with writer_lock(sample_dir):
        started = time.monotonic()
        proc = run_cli(stage, "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", "data.source=sample")
        took = time.monotonic() - started
    assert_user_error(proc, f"{sample_dir} is being written by pid {os.getpid()}")
    assert took < 30
    assert tree_snapshot(sample_dir) == before
    no_debris(sample_dir)  # the holder removed its lock file when it let go


def test_lock_of_a_killed_writer_is_taken_over(params_file, sample_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.storage import writer_lock\n"
                               "with writer_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n",
         str(sample_dir)], env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert (sample_dir / ".lock").read_text().strip() == str(holder.pid)
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up runs: the lock file stays
        holder.wait(timeout=30)
        assert (sample_dir / ".lock").exists()
        proc = run_cli("fetch", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", "data.source=sample")
        assert proc.returncode == 0, proc.stderr
        no_debris(sample_dir)
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
