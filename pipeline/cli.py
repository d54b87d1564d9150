"""`segpipe <stage> [-p params.yaml] [-S dotted.key=value ...]`: a thin CLI over the stage modules.

Exit codes: 0 success, 2 bad input or bad params (one `error: ...` line on stderr, no traceback),
1 anything unexpected, 130 interrupted.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.config import check_key, load_params
from pipeline.errors import UserError
from pipeline.system import handle_sigterm

# stage -> its module: the module's docstring is the stage's help (first line: the one-line help
# of `segpipe --help`; the whole docstring: `segpipe <stage> --help`), its add_arguments(parser)
# the stage's own flags, run(params, args) the command (NEEDS_PARAMS = False: run gets None).
STAGES: dict[str, str] = {
    "fetch": "pipeline.stages.fetch",
    "preprocess": "pipeline.stages.preprocess",
    "train": "pipeline.stages.train",
    "tune": "pipeline.stages.tune",
    "quickstart": "pipeline.stages.quickstart",
    "mlflow-server": "pipeline.stages.mlflow_server",
    "models": "pipeline.stages.models",
    "report": "pipeline.stages.report",
    "ui": "pipeline.stages.ui",
    "predict": "pipeline.stages.predict",
    "bench": "pipeline.stages.bench",
}

# stage flags that stand for a top-level params key (`train --seed N` runs with seed N): checked
# against that key's schema before the stage runs, as -S seed=N would be
FLAG_KEYS = ("seed",)


def stage_source(module: str) -> ast.Module:
    """The parsed source of a stage module, read without importing it (`segpipe --help` stays fast
    whatever the module imports)."""
    spec = importlib.util.find_spec(module)
    return ast.parse(Path(spec.origin).read_text(), spec.origin)


def stage_help(tree: ast.Module) -> tuple[str, str]:
    """(one-line help, description) from a stage module's docstring."""
    doc = ast.get_docstring(tree) or ""
    first = doc.split("\n", 1)[0].strip()
    return first.rstrip("."), doc


def _has_arguments(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == "add_arguments" for n in tree.body)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--params", default="params.yaml", metavar="FILE",
                        help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this call, e.g. -S train.epochs=2 -S data.source=sample "
                             "(value parsed as YAML, as `dvc exp run -S`); repeatable")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines (only warnings and the error line): the same for every stage")


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
    for name, module in STAGES.items():
        tree = stage_source(module)
        short, description = stage_help(tree)
        sp = sub.add_parser(name, help=short, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(sp)
        if _has_arguments(tree):  # only these are imported at start-up (their top-level imports stay light)
            importlib.import_module(module).add_arguments(sp)
    return parser


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """The one logging handler of segpipe: progress of every ``pipeline.*`` logger as plain lines on
    stdout (errors stay ``error: ...`` on stderr, printed by :func:`main`). Idempotent."""
    log = logging.getLogger("pipeline")
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    handle_sigterm()  # SIGTERM unwinds like Ctrl-C: runs end KILLED, exit 143
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.stage:
            parser.print_help()
            return 2
        for key in FLAG_KEYS:
            if getattr(args, key, None) is not None:
                check_key(key, getattr(args, key), f"--{key}")
        if args.quiet:  # every stage's progress goes through the `pipeline` logger
            logging.getLogger("pipeline").setLevel(logging.WARNING)
        module = importlib.import_module(STAGES[args.stage])
        needs_params = getattr(module, "NEEDS_PARAMS", True)
        params = None
        if needs_params:
            params = load_params(args.params, args.overrides)
        return int(module.run(params, args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (errors.Terminated)
        print(f"error: interrupted ({getattr(exc, 'signal_name', 'SIGINT')})", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


def entry() -> None:
    """The `segpipe` command (and `python -m pipeline.cli`): main(), then exit with its code. After
    Ctrl-C / SIGTERM (130 / 143) every run is already ended KILLED, but a driver thread may still sit
    in Ray's C++ code, and tearing the interpreter down around it can crash (SIGSEGV): the process
    then ends at once (os._exit), after flushing its output; its Ray job, workers included, ends with it."""
    code = main()
    if code in (130, 143):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
