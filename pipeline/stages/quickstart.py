"""Run the whole DVC pipeline offline on CPU with the quickstart profile.

Hands the overrides of profiles/quickstart.yaml (plus any -S given here) to `dvc exp run -S`, so the
same dvc.yaml runs on small synthetic data in minutes; DVC records the experiment and applies the
overrides to params.yaml in the workspace (`git checkout params.yaml` returns to the full recipe).
One local Ray is started first and every stage and tune trial joins it (a Ray start costs 10-20 s on
2 cores); --ray-per-stage lets each stage start its own, and ray.address / RAY_ADDRESS use that
cluster instead.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path


from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.profiles import profile_overrides

log = logging.getLogger(__name__)

NEEDS_PARAMS = False


def add_arguments(parser) -> None:
    parser.add_argument("--profile", default="quickstart", help="profile name in profiles/ (default quickstart)")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command and stop")
    parser.add_argument("--ray-per-stage", action="store_true",
                        help="let every stage start its own local Ray (the old path; default: one local Ray "
                             "for the whole run, which every stage and tune trial joins)")


def dvc_set_params(overrides: list[str]) -> list[str]:
    """Our overrides as `dvc exp run -S` arguments (Hydra's grammar): `++k=v` sets a key even when
    params.yaml lacks it; Hydra merges a mapping into the existing one, so a mapping value is set
    as `k=null` first: replaced whole, as our -S does."""
    out = []
    for o in overrides:
        key, value = o.split("=", 1)
        if value.startswith("{"):
            out += ["-S", f"++{key}=null"]
        out += ["-S", f"++{key}={value}"]
    return out


def run(_params, args) -> int:
    overrides = profile_overrides(args.profile) + list(args.overrides)
    p = load_params(args.params, overrides)  # bad overrides fail here, before DVC runs anything
    from pipeline.training.job import check_model

    for name, fam in p.families.items():  # backbone weight files come later, from DVC's weights stage
        check_model(fam.model, {k: v for k, v in fam.options.items() if k != "backbone_weights"},
                    where=f"families.{name}.model")
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.exists() else "dvc", "exp", "run", *dvc_set_params(overrides)]
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    run_dvc(cmd, env, shared_ray=not args.ray_per_stage and not (p.ray.address or os.environ.get("RAY_ADDRESS")))
    from pipeline.data.loaders import load_manifest

    manifest = load_manifest(p.data.dir)
    counts = ", ".join(f"{info['count']} {s}" for s, info in manifest["splits"].items())
    log.info(f"\nquickstart done: {manifest['source']} data, {counts} images in {Path(p.data.dir) / 'shards'}")
    print(summary_table(p))
    return 0


def run_dvc(cmd: list[str], env: dict, shared_ray: bool) -> None:
    """Run `dvc exp run`; with shared_ray, inside one local Ray that every stage joins (a cluster named
    by ray.address / RAY_ADDRESS is used as it is)."""
    if not shared_ray:
        if subprocess.run(cmd, env=env).returncode != 0:
            raise UserError("`dvc exp run` failed (see its output above)")
        return
    from pipeline.system import shared_local_ray

    with shared_local_ray() as ray_env:
        log.info(f"one local Ray for every stage: {ray_env['RAY_ADDRESS']} (--ray-per-stage: one per stage)")
        if subprocess.run(cmd, env={**env, **ray_env}).returncode != 0:
            raise UserError("`dvc exp run` failed (see its output above)")


def summary_table(p) -> str:
    """The final val metrics of every family x seed, from the train stage's
    reports/metrics/<family>-seed<N>.json (+ _detail.json for the model name)."""
    rows = [f"{'family':<10} {'seed':>4} {'model':<30} {'val mIoU':>8} {'pixel acc':>9} {'train s':>8}"]
    for fam in p.families:
        for seed in p.seeds:
            path = Path(p.train.reports_dir) / "metrics" / f"{fam}-seed{seed}.json"
            if not path.is_file():
                rows.append(f"{fam:<10} {seed:>4} (not trained: {path} missing)")
                continue
            m = json.loads(path.read_text())
            detail = path.with_name(f"{fam}-seed{seed}_detail.json")  # ids and strings live beside the metric
            if detail.is_file():
                m = {**json.loads(detail.read_text()), **m}
            rows.append(f"{fam:<10} {seed:>4} {m.get('model', '?'):<30} {m.get('mIoU', float('nan')):>8.3f} "
                        f"{m.get('pixel_acc', float('nan')):>9.3f} {m.get('train_seconds', 0):>8.0f}")
    report = Path(p.train.reports_dir) / "comparison.md"
    if report.is_file():
        rows += ["", f"comparison report: {report} (figures in {report.parent / 'figures'}); "
                     "browse the runs: segpipe ui; predict: segpipe predict --model models:/segpipe-<family>@best IMAGE... --out DIR"]
    return "\n".join(rows)
