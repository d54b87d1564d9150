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


MODES = ("ray per stage", "one Ray")  # the old path (each stage and tune starts its own) vs `segpipe quickstart`'s


def _scratch_repo(repo: Path, dvc: str, env: dict) -> None:
    """A git + DVC copy of the checkout's tracked and untracked-but-not-ignored files (no data/, reports/)."""
    import shutil

    if repo.exists():
        shutil.rmtree(repo)
    for rel in _git_files(ROOT):
        if rel.startswith(("reports/", "data/")):
            continue
        dst = repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst)
    git = ["git", "-c", "user.name=segpipe-bench", "-c", "user.email=bench@localhost"]
    for cmd in (["git", "init", "-q"], *([[dvc, "init", "-q"]] if not (repo / ".dvc").is_dir() else []),
                [dvc, "config", "core.analytics", "false"], [*git, "add", "-A"], [*git, "commit", "-qm", "bench"]):
        res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise UserError(f"`{' '.join(cmd[-3:])}` failed in the scratch repo: {res.stderr.strip()[-300:]}")


def _check_targets(repo: Path, dvc: str, env: dict, targets: list[str]) -> None:
    stages = subprocess.run([dvc, "stage", "list", "--name-only"], cwd=repo, env=env, capture_output=True,
                            text=True).stdout.split()
    missing = [t for t in targets if not any(s == t or s.startswith(t + "@") for s in stages)]
    if missing:
        raise UserError(f"no stage {', '.join(missing)} in dvc.yaml (has {', '.join(stages)}) (--stages)")


def _run_mode(mode: str, repo: Path, dvc: str, env: dict, overrides: list[str], targets: list[str]) -> dict:
    """One `dvc exp run` of the quickstart in a fresh scratch repo, the stages on their own Rays or on
    one shared local Ray (as `segpipe quickstart` runs it); then a no-op `dvc repro`."""
    from pipeline.stages.quickstart import dvc_set_params
    from pipeline.system import shared_local_ray

    _scratch_repo(repo, dvc, env)
    _check_targets(repo, dvc, env, targets)
    cmd = [dvc, "exp", "run", *dvc_set_params(overrides), *targets]
    print(f"[{mode}] scratch repo {repo}\n$ dvc exp run -S <quickstart profile> {' '.join(targets)}", flush=True)
    if mode == MODES[0]:
        rc, lines, total = _timed_lines(cmd, repo, {**env, "RAY_ADDRESS": "local"})
    else:
        with shared_local_ray() as ray_env:
            rc, lines, total = _timed_lines(cmd, repo, {**env, **ray_env})
    if rc != 0:
        raise UserError(f"`dvc exp run` failed in the scratch repo ({mode}):\n" + "\n".join(l for _, l in lines[-30:]))
    stage_times = stage_durations(lines, total)
    for name, secs in stage_times.items():
        print(f"  {name:<24} {secs:7.1f} s", flush=True)
    t0 = time.perf_counter()
    noop = subprocess.run([dvc, "repro", *targets], cwd=repo, env=env, capture_output=True, text=True)
    noop_s = time.perf_counter() - t0
    if noop.returncode != 0 or "Running stage" in noop.stdout:
        raise UserError(f"the second `dvc repro` was not a no-op: {(noop.stdout + noop.stderr).strip()[-600:]}")
    print(f"  no-op dvc repro          {noop_s:7.1f} s", flush=True)
    return {"stages": stage_times, "total": total, "noop": noop_s, "log_tail": [l for _, l in lines[-40:]]}


def bench_pipeline(args, out: Path) -> dict:
    """Each DVC stage of the quickstart, timed twice in the same run: every stage on its own local Ray
    (the path before one shared Ray) and every stage joining one local Ray (`segpipe quickstart`)."""
    from pipeline.config import load_params
    from pipeline.profiles import profile_overrides

    bindir = Path(sys.executable).parent
    dvc = str(bindir / "dvc") if (bindir / "dvc").exists() else "dvc"
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT),
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    overrides = profile_overrides("quickstart")
    if not args.full:
        overrides.append(f"train.epochs={args.epochs or 2}")
    overrides += list(args.overrides)
    load_params(ROOT / "params.yaml", overrides)  # a bad -S fails here, before DVC runs anything
    targets = args.stages.split(",") if args.stages else []
    with Scratch(args.workdir, "pipeline") as work:
        runs = {mode: _run_mode(mode, work / f"repo-{i}", dvc, env, overrides, targets) for i, mode in enumerate(MODES)}
    old, new = (runs[m] for m in MODES)
    rows = []
    for name in new["stages"]:
        a, b = old["stages"].get(name), new["stages"][name]
        rows.append([f"stage {name}", round(a, 1) if a else "-", round(b, 1), round(b / a, 3) if a else "-"])
    rows.append(["dvc exp run, all of it", round(old["total"], 1), round(new["total"], 1), round(new["total"] / old["total"], 3)])
    rows.append(["no-op dvc repro (nothing changed)", round(old["noop"], 1), round(new["noop"], 1), "-"])
    columns = ["step", f"s, {MODES[0]}", f"s, {MODES[1]}", "one Ray / per stage"]
    goals = [goal("pipeline: no-op `dvc repro` seconds", new["noop"], 10.0, False),
             goal("pipeline: quickstart with one Ray / with a Ray per stage (wall clock)", new["total"] / old["total"], 1.0, False),
             goal("pipeline: quickstart minutes with one Ray (dvc exp run)", new["total"] / 60, 10.0 if args.full else None, False)]
    variant = ("the quickstart profile" if args.full
               else f"the quickstart profile with train.epochs={args.epochs or 2} (the real one: --full)")
    notes = [f"`dvc exp run -S ...` with {variant}, as `segpipe quickstart` runs it, twice in fresh scratch git + DVC "
             f"copies of the checkout: '{MODES[0]}' = every segpipe stage starts its own local Ray (RAY_ADDRESS=local, "
             f"the path before), '{MODES[1]}' = one local Ray started first that every stage and tune trial joins "
             "(`segpipe quickstart`'s default). A stage's time runs from DVC's 'Running stage' line to the next one, "
             "so DVC's own hashing and lock writing are included."]
    if targets:
        notes.append(f"only the stages {', '.join(targets)} (and what they depend on).")
    settings = {"overrides": overrides, "targets": targets, "full": args.full}
    return report("pipeline", out, columns, rows, goals, settings, notes,
                  extra={"stage_seconds": new["stages"], "stage_seconds_ray_per_stage": old["stages"],
                         "total_seconds": new["total"], "total_seconds_ray_per_stage": old["total"],
                         "noop_seconds": new["noop"], "log_tail": new["log_tail"]})
