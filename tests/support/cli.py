"""Running `segpipe ...` (in this process or a fresh one) and checking its user-error contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT


class RayStarted(AssertionError):
    """Raised by run_cli(no_ray=True) where the command would have started or joined a Ray."""


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, fresh: bool = False,
            no_ray: bool = False) -> subprocess.CompletedProcess:
    """Run `segpipe ...`, capturing its exit code, stdout and stderr.

    fresh=True: a new process, as a user runs it (for what only a process shows: a timeout, a
    signal, a server that must not start, its memory). Default: the CLI's own entry point
    (pipeline.cli.main, what the `segpipe` script calls) in this process, in `cwd`, with this
    process's environment and working directory restored afterwards; an exception escaping main()
    comes back as exit 1 with its traceback on stderr, as the process would print it. Each fresh
    process pays 4-6 s of imports (torch, torchvision, MLflow, Ray), most of the suite's error-path
    tests' time. no_ray=True (in-process): any attempt to start or join a Ray (pipeline.system.ray_init,
    ray.init) raises RayStarted, which comes back as exit 1 with its traceback: the check for "bad
    input stops everything before Ray", stronger than reading a process's log for Ray's banner."""
    if fresh:
        env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd or ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    import contextlib
    import io
    import traceback

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    env, here = dict(os.environ), os.getcwd()

    def started(*_a, **_k):
        raise RayStarted("the command started (or joined) a Ray")

    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
            if no_ray:
                import ray

                from pipeline import system

                mp.setattr(system, "ray_init", started)
                mp.setattr(ray, "init", started)
            try:
                rc = main(list(args))
            except SystemExit as exc:  # argparse: --help (0), a usage error (2)
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001  (what the process would die with)
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)
    return subprocess.CompletedProcess(["segpipe", *args], rc, out.getvalue(), err.getvalue())


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one `error:` line naming what is wrong, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
