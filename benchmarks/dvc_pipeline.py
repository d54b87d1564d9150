"""`segpipe bench pipeline`: wall-clock of each DVC stage of the quickstart in a scratch copy of the
repo, then of a no-op `dvc repro`. (Not named pipeline.py: that would shadow the package.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Scratch, goal, report
from pipeline.errors import UserError
from pipeline.storage import REPO as ROOT


def _git_files(root: Path) -> list[str]:
    res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"{root} is not a git checkout: `segpipe bench pipeline` copies its files (git ls-files)")
    return [f for f in res.stdout.split("\0") if f and (root / f).is_file()]


def _timed_lines(cmd: list[str], cwd: Path, env: dict) -> tuple[int, list[tuple[float, str]], float]:
    """Run cmd, stdout+stderr merged and echoed; returns (exit code, [(seconds since start, line)], total s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        print(f"  | {lines[-1][1]}", flush=True)
    rc = proc.wait()
    return rc, lines, time.perf_counter() - t0


def stage_durations(lines: list[tuple[float, str]], total: float) -> dict[str, float]:
    """From DVC's log: each "Running stage 'X':" lasts until the next stage line (or the end)."""
    import re

    marks = [(t, m.group(1)) for t, line in lines if (m := re.search(r"Running stage '([^']+)'", line))]
    ends = [t for t, line in lines if re.search(r"Running stage '|Stage '[^']+' didn't change|Ran experiment", line)]
    out = {}
    for t, name in marks:
        later = [e for e in ends if e > t]
        out[name] = (later[0] if later else total) - t
    return out


def bench_pipeline(args, out: Path) -> dict:
    import shutil

    from pipeline.config import load_params
    from pipeline.stages.quickstart import profile_overrides

    bindir = Path(sys.executable).parent
    dvc = str(bindir / "dvc") if (bindir / "dvc").exists() else "dvc"
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT),
               RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    overrides = profile_overrides("quickstart")
    if not args.full:
        overrides.append(f"train.epochs={args.epochs or 2}")
    overrides += list(args.overrides)
    targets = args.stages.split(",") if args.stages else []
    notes = []
    with Scratch(args.workdir, "pipeline") as work:
        repo = work / "repo"
        if repo.exists():
            shutil.rmtree(repo)
        for rel in _git_files(ROOT):
            if rel.startswith(("reports/", "data/")):
                continue
            dst = repo / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst)
        load_params(repo / "params.yaml", overrides)  # a bad -S fails here, before DVC runs anything
        run = lambda cmd: subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        git = ["git", "-c", "user.name=segpipe-bench", "-c", "user.email=bench@localhost"]
        for cmd in (["git", "init", "-q"], *([[dvc, "init", "-q"]] if not (repo / ".dvc").is_dir() else []),
                    [dvc, "config", "core.analytics", "false"], [*git, "add", "-A"], [*git, "commit", "-qm", "bench"]):
            res = run(cmd)
            if res.returncode != 0:
                raise UserError(f"`{' '.join(cmd[-3:])}` failed in the scratch repo: {res.stderr.strip()[-300:]}")
        listed = run([dvc, "stage", "list", "--name-only"])
        stages = listed.stdout.split()
        missing = [t for t in targets if not any(s == t or s.startswith(t + "@") for s in stages)]
        if missing:
            raise UserError(f"no stage {', '.join(missing)} in dvc.yaml (has {', '.join(stages)}) (--stages)")
        from pipeline.stages import quickstart

        set_params = getattr(quickstart, "dvc_set_params", lambda os_: [x for o in os_ for x in ("-S", o)])
        cmd = [dvc, "exp", "run", *set_params(overrides), *targets]  # what `segpipe quickstart` runs
        print(f"scratch repo {repo}\n$ dvc exp run -S <quickstart profile{'' if args.full else ', train.epochs=' + str(args.epochs or 2)}>"
              + (" " + " ".join(targets) if targets else ""), flush=True)
        rc, lines, total = _timed_lines(cmd, repo, env)
        if rc != 0:
            raise UserError("`dvc exp run` failed in the scratch repo:\n" + "\n".join(l for _, l in lines[-30:]))
        stage_times = stage_durations(lines, total)
        for name, secs in stage_times.items():
            print(f"  {name:<24} {secs:7.1f} s", flush=True)
        t0 = time.perf_counter()
        noop = run([dvc, "repro", *targets])
        noop_s = time.perf_counter() - t0
        if noop.returncode != 0 or "Running stage" in noop.stdout:
            raise UserError(f"the second `dvc repro` was not a no-op: {(noop.stdout + noop.stderr).strip()[-600:]}")
        print(f"  no-op dvc repro          {noop_s:7.1f} s", flush=True)
    rows = [[f"stage {name}", round(secs, 1), round(secs / total, 3)] for name, secs in stage_times.items()]
    rows.append(["dvc exp run, all of it", round(total, 1), 1.0])
    rows.append(["no-op dvc repro (nothing changed)", round(noop_s, 1), round(noop_s / total, 3)])
    columns = ["step", "seconds", "share"]
    goals = [goal("pipeline: no-op `dvc repro` seconds", noop_s, 10.0, False)]
    variant = ("the quickstart profile" if args.full
               else f"the quickstart profile with train.epochs={args.epochs or 2} (the real one: --full)")
    notes.append(f"`dvc exp run -S ...` with {variant}, as `segpipe quickstart` runs it, in a scratch git + DVC copy "
                 "of the checkout; a stage's time runs from DVC's 'Running stage' line to the next one, so DVC's own "
                 "hashing and lock writing are included; every `segpipe train` starts its own local Ray.")
    if targets:
        notes.append(f"only the stages {', '.join(targets)} (and what they depend on).")
    settings = {"overrides": overrides, "targets": targets, "full": args.full}
    return report("pipeline", out, columns, rows, goals, settings, notes,
                  extra={"stage_seconds": stage_times, "total_seconds": total, "noop_seconds": noop_s,
                         "log_tail": [l for _, l in lines[-40:]]})
