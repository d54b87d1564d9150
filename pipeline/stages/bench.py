"""Speed benchmarks (loader, preprocess, model, ray, pipeline, gpu) as ratios to a baseline.

Each benchmark times ours against a baseline in the same run, prints a table and the ratio, and
writes <out>/<what>.json (with machine info) and bench.md beside <out> (default reports/bench).
loader: our shard loader vs torchvision VOCSegmentation (same images, augmentation, workers) and Ray
Data; preprocess: 1 vs all cores, peak RSS at two sizes; model: ours vs torchvision's identical
models (channels_last, --compile); ray: Ray Train loop vs a plain loop, 1 vs 2 workers; pipeline:
each DVC stage of the quickstart and a no-op dvc repro; gpu: benchmarks/gpu_bench.py (pure torch,
CUDA). Defaults take under ~2 minutes each on CPU (pipeline: the whole quickstart with 2 epochs);
--quick only checks that it runs.
"""

# How it works (developer notes):
# `segpipe bench <what>`: speed benchmarks that print a table and the ratio against a baseline
# measured in the same run, and write <out>/<what>.json (machine info included) and <out>/../bench.md.
#
#   loader      decode + train-augmentation images/s of the loader `segpipe train` builds (Parquet
#               shards, fused uint8 augmentation) vs torchvision.datasets.VOCSegmentation over the
#               same JPEG/PNG files with the same augmentation (torchvision.transforms.v2, step by step)
#               and the same DataLoader workers; also our shards with the step-by-step transform (the
#               loader before this benchmark) and the Ray Data path. Images are synthetic VOC-like
#               500x375 JPEGs.
#   preprocess  `segpipe preprocess` images/s with 1 process vs all cores, and the peak RSS at two
#               set sizes (it must stay flat as the set grows).
#   model       forward+backward and inference ms/batch of our models vs torchvision's identical
#               ones (same weights), channels_last off/on, torch.compile off/on (--compile).
#   ray         img/s of the Ray Train loop (pipeline.training.job.fit) vs a plain single-process loop
#               (the same pipeline.training.setup) on the same data and model; 1 vs 2 workers.
#   pipeline    wall-clock of each DVC stage of the quickstart (2 epochs unless --full) in a scratch
#               copy of the repo, then of a no-op `dvc repro`.
#   gpu         benchmarks/gpu_bench.py: pure-torch training of each family at the full recipe's crop
#               and batch, AMP + channels_last (+ --compile), beside torchvision's model (CUDA GPU).
#   verify      the shard check before train/tune vs one loader pass over the same shards.
#   md          only rewrite <out>/../bench.md from the <what>.json files in <out>.
#
# The benchmarks live in benchmarks/ of the checkout, not in the installed package: this module holds
# the flags and hands over to benchmarks.runner (`error:` when there is no checkout).
# Timings on a shared machine are noisy: every ratio compares runs interleaved in the same process,
# and medians are reported. Nothing here asserts a speed; the goals are printed as met / not met.

from __future__ import annotations

import importlib
import sys

from pipeline.errors import UserError
from pipeline.storage import REPO

NEEDS_PARAMS = False
WHAT = ("loader", "preprocess", "model", "ray", "pipeline", "gpu", "verify", "md")  # = benchmarks.common.WHAT


def add_arguments(parser) -> None:
    parser.add_argument("what", choices=WHAT, help="which benchmark: " + ", ".join(WHAT))
    parser.add_argument("--out", default="reports/bench", metavar="DIR",
                        help="where <what>.json goes; bench.md is written beside DIR (default reports/bench)")
    parser.add_argument("--name", help="write <out>/<name>.json instead of <what>.json (e.g. to keep a 'before' run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, figures mean little")
    parser.add_argument("--workdir", metavar="DIR", help="scratch data goes here (default: a temp dir, removed after)")
    g = parser.add_argument_group("sizes (defaults keep each CPU benchmark under ~2 minutes)")
    g.add_argument("--images", type=int, metavar="N", help="loader: train images (320); ray: train images (64)")
    g.add_argument("--sizes", metavar="N,N", help="preprocess: set sizes for the RSS check (1000,3000)")
    g.add_argument("--workers", type=int, metavar="N", help="loader: DataLoader workers (2)")
    g.add_argument("--batch-size", type=int, metavar="N", help="loader 8, model 2, ray 8, gpu 8")
    g.add_argument("--crop", type=int, metavar="PX", help="loader 513, model 96, ray 96, gpu 513")
    g.add_argument("--repeats", type=int, metavar="N", help="timed rounds, interleaved (loader 5, model 4, preprocess 2)")
    g.add_argument("--epochs", type=int, metavar="N", help="ray: epochs per run (4); pipeline: train.epochs (2)")
    g.add_argument("--models", metavar="A,B", help="model/gpu: registry names to time (model default: the "
                                                    "torchvision-identical models of seg_models' registry)")
    g.add_argument("--compile", action="store_true", help="model/gpu: also time torch.compile (minutes on CPU)")
    g.add_argument("--no-ray", action="store_true", help="loader: skip the Ray Data path")
    g.add_argument("--ray-workers", default="1,2", metavar="N,N", help="ray: Ray Train worker counts to run (1,2)")
    g.add_argument("--full", action="store_true", help="pipeline: the quickstart profile as it is (8 epochs)")
    g.add_argument("--stages", metavar="A,B", help="pipeline: only these DVC stages (and the no-op repro of them)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="model: where to run (auto); gpu: cpu only checks that it runs")
    g.add_argument("--threads", type=int, metavar="N", help="model, ray: torch threads per process (CPU default 1)")



def run(_params, args) -> int:
    if not (REPO / "benchmarks" / "runner.py").is_file():
        raise UserError(f"`segpipe bench` runs from a checkout of the repository: {REPO / 'benchmarks'} is missing "
                        "(the benchmarks are not part of the installed package)")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("benchmarks.runner").run(args)
