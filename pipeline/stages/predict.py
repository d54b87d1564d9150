"""Segment images with a trained model: coloured masks and overlays.

--model is a checkpoint written by train (models/<family>-seed<N>.pt) or a registry URI
(models:/segpipe-<family>@best, registered by `segpipe report`). Each image is resized to fit the
eval size (--size; default the one the model was trained with), segmented, and the prediction is
resized back: <out>/<name>_mask.png (VOC palette PNG of class ids) and <name>_overlay.png. Images
that cannot be read are named at the end (exit 2); the others are still written.
"""

# How it works (developer notes):
# Each image is segmented at the model's eval size (shrunk to fit, padded, prediction resized back to
# the image's own size) and written as <DIR>/<name>_mask.png (palette PNG: pixel = VOC class id,
# shown in the VOC colours) and <DIR>/<name>_overlay.png (the image with the classes blended in).
# Images that cannot be read are reported by name at the end (exit 2); the others are still written.

from __future__ import annotations

from pathlib import Path

NEEDS_PARAMS = False  # run() reads params.yaml when there is one


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="a checkpoint written by `segpipe train` (models/<family>-seed<N>.pt) or a Model "
                             "Registry URI: models:/segpipe-<family>@best (registered by `segpipe report`), "
                             "models:/<name>/<version>")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...) or directories of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="where <name>_mask.png and <name>_overlay.png go")
    parser.add_argument("--size", type=int, default=None,
                        help="inference size (the image is shrunk to fit a size x size square); default: the "
                             "eval size the model was trained with (checkpoint, else its MLflow run), else "
                             "params.yaml's train.eval_size")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when present (default)")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="pixel budget: a larger image is shrunk to about N pixels before anything else "
                             "(JPEGs are decoded at reduced scale) and its mask/overlay are written at that size; "
                             "default predict.max_pixels of params.yaml (8000000: peak memory under ~2 GB)")


def run(_params, args) -> int:
    from pipeline.config import apply_overrides, load_params, validate
    from pipeline.reporting.predict import predict

    # a checkpoint needs no params.yaml: without one (and no -p), the defaults give the tracking URI
    if Path(args.params).is_file() or args.params != "params.yaml":
        p = load_params(args.params, args.overrides)
    else:
        p = validate(apply_overrides({}, args.overrides), "defaults with -S overrides")
    predict(p, args.model, args.images, args.out, size=args.size, device=args.device, progress=not args.quiet,
            max_pixels=args.max_pixels)
    return 0
