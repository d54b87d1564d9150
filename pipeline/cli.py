"""`segpipe <stage> [-p params.yaml] [-S dotted.key=value ...]`: a thin CLI over the stage modules.

Exit codes: 0 success, 2 bad input or bad params (one `error: ...` line on stderr, no traceback),
1 anything unexpected, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from pipeline import __version__
from pipeline.errors import UserError

# stage -> (module, one-line help, longer description)
STAGES: dict[str, tuple[str, str, str]] = {
    "fetch": (
        "pipeline.fetch",
        "bring a VOC-layout dataset to <data.dir>/raw/",
        """By data.source: `sample` (10 real VOC images bundled in assets/), `synthetic` (generated
        VOC-format scenes, data.synthetic.*), `voc2012` (downloads the official trainval tar with
        resume and md5 check), `voc2012_aug` (plus SBD -> the 10,582-image train_aug split), a path
        to a VOC tar, or a directory holding VOCdevkit/. Archives are extracted safely (no absolute
        paths, '..', outside links or device files); a failure leaves the previous raw/ intact.""",
    ),
    "preprocess": (
        "pipeline.preprocess",
        "validate every image/mask pair and write Parquet shards + manifest.json",
        """Reads <data.dir>/raw/, validates every pair on all cores (undecodable or truncated images,
        mask values outside 0..20/255, size mismatches, ids without a mask: all reported at once),
        writes <data.dir>/shards/<split>/part-NNNNN.parquet (original JPEG bytes, PNG masks, row
        groups <= data.row_group_rows) and shards/manifest.json. Old shards stay until the new set
        is complete.""",
    ),
    "train": (
        "pipeline.train",
        "train one family with Ray Train (DDP), tracked in MLflow",
        """Trains families.<--family> (or train.model) on <data.dir>/shards with ray.num_workers Ray
        Train workers (gloo on CPU, NCCL on GPUs); starts a local Ray unless ray.address / RAY_ADDRESS
        names a cluster. Evaluates every train.eval_every epochs (confusion matrix all-reduced over
        workers), checkpoints every epoch under ray.storage_path (train.resume continues the latest
        run), logs params, per-epoch metrics, per-class IoU, confusion matrix, prediction grid and the
        model to MLflow, and writes <models_dir>/<family>.pt and <reports_dir>/metrics/<family>.json.""",
    ),
    "quickstart": (
        "pipeline.quickstart",
        "run the whole DVC pipeline offline on CPU with the quickstart profile",
        """Hands the overrides of profiles/quickstart.yaml (plus any -S given here) to `dvc exp run -S`,
        so the same dvc.yaml runs on small synthetic data in minutes; DVC records the experiment and
        applies the overrides to params.yaml in the workspace (`git checkout params.yaml` returns to
        the full recipe).""",
    ),
    "models": (
        "pipeline.models",
        "list the model registry: family, parameters, GFLOPs, options",
        """Prints every model name seg_models.build_model accepts, with its family, parameter count,
        GFLOPs at --size x --size and the options it takes (upsample, atrous_rates, ...).""",
    ),
}

STAGE_ARGS = {"models", "quickstart", "train"}  # modules with stage-specific flags (cheap to import)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--params", default="params.yaml", metavar="FILE",
                        help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this call, e.g. -S train.epochs=2 -S data.source=sample "
                             "(value parsed as YAML, as `dvc exp run -S`); repeatable")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors: one line, exit 2
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="segpipe",
        description="Reproducible FCN / DeepLabV3 / LRASPP / UNet comparison on PASCAL VOC "
                    "(DVC stages, Ray Train/Tune, MLflow tracking).",
        epilog="Every stage reads params.yaml (-p) with -S overrides. `segpipe <stage> --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"segpipe {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", parser_class=_Parser)
    for name, (module, short, long) in STAGES.items():
        sp = sub.add_parser(name, help=short, description=short[0].upper() + short[1:] + ".\n\n"
                            + textwrap.fill(textwrap.dedent(long).replace("\n", " "), 96),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(sp)
        mod = importlib.import_module(module) if name in STAGE_ARGS else None
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.stage:
            parser.print_help()
            return 2
        module = importlib.import_module(STAGES[args.stage][0])
        needs_params = getattr(module, "NEEDS_PARAMS", True)
        params = None
        if needs_params:
            from pipeline.config import load_params

            params = load_params(args.params, args.overrides)
        return int(module.run(params, args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
