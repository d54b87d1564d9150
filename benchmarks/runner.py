"""The entry of `segpipe bench <what>` (pipeline.stages.bench imports it from the checkout): flag
checks, `md`, and the table of benchmarks; `gpu` runs benchmarks/gpu_bench.py's main()."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.common import RESULT_NAME, write_markdown
from benchmarks.dvc_pipeline import bench_pipeline
from benchmarks.loader import bench_loader
from benchmarks.model import bench_model
from benchmarks.preprocess import bench_preprocess
from benchmarks.ray_train import bench_ray
from benchmarks.verify import bench_verify
from pipeline.errors import UserError


def bench_gpu(args, out: Path) -> dict:
    from benchmarks import gpu_bench as mod

    argv = ["--out", str(out)]
    if args.quick:
        argv.append("--quick")
    if args.compile:
        argv.append("--compile")
    if args.models:
        argv += ["--models", args.models]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    if args.crop:
        argv += ["--crop", str(args.crop)]
    if args.device == "cpu":
        argv += ["--device", "cpu"]
    if args.name:
        argv += ["--name", args.name]
    try:
        payload = mod.main(argv + ["--no-md"])
    except SystemExit as exc:  # the script's own `error: ...` exits
        msg = str(exc.code or "")
        raise UserError(msg.removeprefix("error: ") + " (segpipe bench gpu)") from None
    write_markdown(out)
    print(f"wrote {out.parent / 'bench.md'}")
    return payload


BENCHES = {"loader": bench_loader, "preprocess": bench_preprocess, "model": bench_model, "ray": bench_ray,
           "pipeline": bench_pipeline, "gpu": bench_gpu, "verify": bench_verify}


def run(args) -> int:
    """`segpipe bench <what>` (pipeline.stages.bench dispatches here): check the flags, run one benchmark."""
    out = Path(args.out)
    for name in ("images", "workers", "batch_size", "crop", "repeats", "epochs", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < (0 if name == "workers" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'workers' else 'positive'}, got {v}")
    if args.overrides and args.what != "pipeline":
        raise UserError("-S only applies to `segpipe bench pipeline` (the stages' params) (-S)")
    if args.what == "md":
        path = write_markdown(out)
        print(f"wrote {path} from {out}/*.json")
        return 0
    if args.name is not None and (not args.name or not all(c.isalnum() or c in "-_" for c in args.name)):
        raise UserError(f"--name takes letters, digits, '-' and '_', got {args.name!r} (--name)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    RESULT_NAME["name"] = args.name or ""
    try:
        BENCHES[args.what](args, out)
    finally:
        RESULT_NAME.clear()
    return 0
