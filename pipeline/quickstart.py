"""`segpipe quickstart`: run the whole DVC pipeline on the quickstart profile, offline, on CPU.

The profile (profiles/quickstart.yaml) is a set of `-S` overrides over params.yaml; they are
handed to `dvc exp run -S ...`, so the same dvc.yaml runs and the experiment is recorded by DVC
(`dvc exp show`). DVC applies the overrides to params.yaml in the workspace: `git checkout
params.yaml` returns to the full recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import load_params
from pipeline.errors import UserError

NEEDS_PARAMS = False
PROFILES = Path(__file__).resolve().parent.parent / "profiles"


def add_arguments(parser) -> None:
    parser.add_argument("--profile", default="quickstart", help="profile name in profiles/ (default quickstart)")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command and stop")


def profile_overrides(name: str) -> list[str]:
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise UserError(f"no profile {name!r} in {PROFILES} (have {have}) (--profile)")
    raw = yaml.safe_load(path.read_text()) or {}  # dotted keys; a mapping value replaces the whole entry
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in raw.items()]


def run(_params, args) -> int:
    overrides = profile_overrides(args.profile) + list(args.overrides)
    p = load_params(args.params, overrides)  # bad overrides fail here, before DVC runs anything
    from pipeline.train import check_model

    for fam in p.families.values():
        check_model(fam.model, fam.options)
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.exists() else "dvc", "exp", "run"]
    for o in overrides:
        cmd += ["-S", o]
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if subprocess.run(cmd, env=env).returncode != 0:
        raise UserError("`dvc exp run` failed (see its output above)")
    from pipeline.data import load_manifest

    manifest = load_manifest(p.data.dir)
    counts = ", ".join(f"{info['count']} {s}" for s, info in manifest["splits"].items())
    print(f"\nquickstart done: {manifest['source']} data, {counts} images in {Path(p.data.dir) / 'shards'}")
    print(summary_table(p))
    return 0


def summary_table(p) -> str:
    """The families' final val metrics, from the train stage's reports/metrics/<family>.json."""
    rows = [f"{'family':<10} {'model':<30} {'val mIoU':>8} {'pixel acc':>9} {'train s':>8}"]
    for fam in p.families:
        path = Path(p.train.reports_dir) / "metrics" / f"{fam}.json"
        if not path.is_file():
            rows.append(f"{fam:<10} (not trained: {path} missing)")
            continue
        m = json.loads(path.read_text())
        rows.append(f"{fam:<10} {m['model']:<30} {m.get('mIoU', float('nan')):>8.3f} "
                    f"{m.get('pixel_acc', float('nan')):>9.3f} {m.get('train_seconds', 0):>8.0f}")
    return "\n".join(rows)
