"""`segpipe <stage> [-p params.yaml] [-S dotted.key=value ...]`: a thin CLI over the stage modules.

Exit codes: 0 success, 2 bad input or bad params (one `error: ...` line on stderr, no traceback),
1 anything unexpected, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap

from pipeline import __version__
from pipeline.errors import UserError

# stage -> (module, one-line help, longer description)
STAGES: dict[str, tuple[str, str, str]] = {
    "fetch": (
        "pipeline.stages.fetch",
        "bring a VOC-layout dataset to <data.dir>/raw/",
        """By data.source: `sample` (10 real VOC images bundled in assets/), `synthetic` (generated
        VOC-format scenes, data.synthetic.*), `voc2012` (downloads the official trainval tar with
        resume and md5 check), `voc2012_aug` (plus SBD -> the 10,582-image train_aug split), a path
        to a VOC tar, or a directory holding VOCdevkit/. Archives are extracted safely (no absolute
        paths, '..', outside links or device files); a failure leaves the previous raw/ intact.""",
    ),
    "preprocess": (
        "pipeline.stages.preprocess",
        "validate every image/mask pair and write Parquet shards + manifest.json",
        """Reads <data.dir>/raw/, validates every pair on all cores (undecodable or truncated images,
        mask values outside 0..20/255, size mismatches, ids without a mask: all reported at once),
        writes <data.dir>/shards/<split>/part-NNNNN.parquet (original JPEG bytes, PNG masks, row
        groups <= data.row_group_rows) and shards/manifest.json. Old shards stay until the new set
        is complete.""",
    ),
    "train": (
        "pipeline.stages.train",
        "train one family with Ray Train (DDP), tracked in MLflow",
        """Trains families.<--family> (or train.model) on <data.dir>/shards with ray.num_workers Ray
        Train workers (gloo on CPU, NCCL on GPUs); starts a local Ray unless ray.address / RAY_ADDRESS
        names a cluster. Evaluates every train.eval_every epochs (confusion matrix all-reduced over
        workers), checkpoints every epoch under ray.storage_path (train.resume continues the latest
        run), logs params, per-epoch metrics, per-class IoU, confusion matrix, prediction grid and the
        model to MLflow, and writes <models_dir>/<family>-seed<N>.pt and <reports_dir>/metrics/<family>-seed<N>.json
        (--seed N overrides `seed`; DVC's train matrix runs every family x seeds). --all trains every
        family x seed at once on the Ray cluster, each its own TorchTrainer packed by Ray's resources,
        with the same runs and outputs (progress lines prefixed family/seedN; a failed run is named,
        the others finish).""",
    ),
    "tune": (
        "pipeline.stages.tune",
        "Ray Tune search per family (ASHA on val/mIoU), nested MLflow runs, best params",
        """For each family of tune.families (or --family): checks the whole search space of
        tune.space.<family> first (model options such as atrous_rates / output_stride / aspp /
        upsample, `variant` 32s/16s/8s for FCN, `model`, and lr / weight_decay / momentum; each a
        {choice|grid|uniform|loguniform} entry or a fixed value), then runs one trial per config: the
        TorchTrainer of `segpipe train` for up to tune.max_epochs epochs, ASHA stopping weak trials on
        val/mIoU (tune.grace_period, tune.reduction_factor). Search: random/grid, or Optuna TPE
        (tune.search_alg). MLflow: a parent run (stage=tune) with the best config, trials.csv and
        plots, one child run per trial (stage=tune-trial). Writes <reports_dir>/tune/<family>/
        best_params.yaml (train it: segpipe train -p ... --family F), best_config.json, metrics.json,
        trials.csv and plots/. tune.resume continues the latest interrupted tune (Ctrl-C exits 130);
        --apply merges the best config into params.yaml without running anything.""",
    ),
    "quickstart": (
        "pipeline.stages.quickstart",
        "run the whole DVC pipeline offline on CPU with the quickstart profile",
        """Hands the overrides of profiles/quickstart.yaml (plus any -S given here) to `dvc exp run -S`,
        so the same dvc.yaml runs on small synthetic data in minutes; DVC records the experiment and
        applies the overrides to params.yaml in the workspace (`git checkout params.yaml` returns to
        the full recipe).""",
    ),
    "mlflow-server": (
        "pipeline.stages.mlflow_server",
        "run the MLflow tracking server a cluster logs to (proxied artifacts)",
        """`mlflow server` over the backend store of mlflow.tracking_uri (sqlite or postgresql://) with
        --serve-artifacts, bound to 127.0.0.1 unless --host says otherwise. Point jobs at it with
        MLFLOW_TRACKING_URI=http://HOST:PORT (cluster/runtime_env.yaml); artifacts are uploaded through
        the server into --artifacts-destination. Runs until Ctrl-C.""",
    ),
    "models": (
        "pipeline.stages.models",
        "list the model registry: family, parameters, GFLOPs, options",
        """Prints every model name seg_models.build_model accepts, with its family, parameter count,
        GFLOPs at --size x --size and the options it takes (upsample, atrous_rates, ...).""",
    ),
    "report": (
        "pipeline.stages.report",
        "compare the families from the MLflow runs: comparison.md/.json + PNGs, register the best models",
        """Reads the runs from the MLflow tracking store (not local files): per family of params.yaml and
        seed of `seeds`, the latest FINISHED stage=train run of the configured model. Writes
        <reports_dir>/comparison.md, comparison.json and figures/: val mIoU (mean +- std over seeds),
        pixel/mean accuracy, params, GFLOPs and latency (measured here: batch 1, eval size, on
        report.device), training time, img/s, per-class IoU, mIoU vs params/latency, mIoU per epoch,
        confusion matrices, a qualitative grid on the same val images, Ray Tune plots when tune trials
        exist, which differences are inside the seed spread, and how it was produced. Registers each
        family's best run as segpipe-<family> with alias `best` (report.register_best).""",
    ),
    "ui": (
        "pipeline.stages.ui",
        "serve the MLflow UI for the tracking store on 127.0.0.1",
        """Starts `mlflow server` on mlflow.tracking_uri bound to 127.0.0.1 (--port, default 5000),
        prints the URL and runs until Ctrl-C, then stops the server. In the UI: experiment `segpipe`,
        filter tags.stage = 'train', select runs, Compare (see README, MLflow UI).""",
    ),
    "predict": (
        "pipeline.stages.predict",
        "segment images with a trained model: coloured masks and overlays",
        """--model is a checkpoint written by train (models/<family>-seed<N>.pt) or a registry URI
        (models:/segpipe-<family>@best, registered by `segpipe report`). Each image is resized to fit
        the eval size (--size; default the one the model was trained with), segmented, and the prediction is
        resized back: <out>/<name>_mask.png (VOC palette PNG of class ids) and <name>_overlay.png.
        Images that cannot be read are named at the end (exit 2); the others are still written.""",
    ),
    "bench": (
        "pipeline.stages.bench",
        "speed benchmarks (loader, preprocess, model, ray, pipeline, gpu) as ratios to a baseline",
        """Each benchmark times ours against a baseline in the same run, prints a table and the ratio,
        and writes <out>/<what>.json (with machine info) and bench.md beside <out> (default
        reports/bench). loader: our shard loader vs torchvision VOCSegmentation (same images,
        augmentation, workers) and Ray Data; preprocess: 1 vs all cores, peak RSS at two sizes; model:
        ours vs torchvision's identical models (channels_last, --compile); ray: Ray Train loop vs a
        plain loop, 1 vs 2 workers; pipeline: each DVC stage of the quickstart and a no-op dvc repro;
        gpu: benchmarks/gpu_bench.py (pure torch, CUDA). Defaults take under ~2 minutes each on CPU
        (pipeline: the whole quickstart with 2 epochs); --quick only checks that it runs.""",
    ),
}

STAGE_ARGS = {"fetch", "mlflow-server", "models", "quickstart", "train", "ui", "predict", "tune", "bench"}  # modules with stage-specific flags (cheap to import)


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
                            + textwrap.fill(" ".join(long.split()), 96),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(sp)
        mod = importlib.import_module(module) if name in STAGE_ARGS else None
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(sp)
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
