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

import os
import re
import sys
from pathlib import Path

import numpy as np

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.data.voc import VOC_CLASSES

NEEDS_PARAMS = False  # run() reads params.yaml when there is one
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


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


# ------------------------------------------------------------------------------------- model


def _store_exists(uri: str) -> bool:
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def _run_eval_size(uri: str, run_id: str | None) -> int | None:
    """train.eval_size of an MLflow run, when the store and the run are there."""
    if not run_id or not _store_exists(uri):
        return None
    from pipeline.tracking import client

    try:
        v = client(uri).get_run(run_id).data.params.get("train.eval_size")
        return int(v) if v else None
    except Exception:
        return None


def _registry_run_id(uri: str, model_uri: str) -> str | None:
    from pipeline.tracking import client

    c = client(uri)
    m = re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri)
    try:
        if m:
            return c.get_model_version_by_alias(m.group(1), m.group(2)).run_id
        m = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
        if m:
            return c.get_model_version(m.group(1), m.group(2)).run_id
        m = re.fullmatch(r"models:/(m-[0-9a-f]+)", model_uri)
        if m:
            return c.get_logged_model(m.group(1)).source_run_id
    except Exception:
        return None
    return None


def load_model(spec: str, p: Params, device) -> tuple[object, int | None, str]:
    """(eval-mode model on device, eval size of its run or None, description)."""
    from pipeline.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(p.mlflow.tracking_uri)
    if spec.startswith(("models:/", "runs:/")):
        if not _store_exists(uri):
            raise UserError(f"no MLflow store at {uri[len('sqlite:///'):]}: cannot resolve {spec} (mlflow.tracking_uri)")
        from pipeline.tracking import rehome_store

        rehome_store(uri)  # a moved checkout: the store's artifact locations follow it
        run_id = _registry_run_id(uri, spec) if spec.startswith("models:/") else spec[len("runs:/"):].split("/")[0]
        if not run_id:
            raise UserError(f"cannot resolve {spec} in {uri}: no such registered model / version; `segpipe report` "
                            "registers segpipe-<family>@best (--model)")
        model, state = load_run_checkpoint(uri, run_id, spec)
        return model.to(device).eval(), state.get("eval_size") or _run_eval_size(uri, run_id), spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"no such checkpoint: {spec} (give models/<family>-seed<N>.pt or "
                        "models:/segpipe-<family>@best) (--model)")
    from pipeline.stages.train import load_checkpoint_model

    try:
        model, state = load_checkpoint_model(path)  # torch.load(weights_only=True): data never runs code
    except UserError as exc:
        raise UserError(f"{exc} (--model)") from None
    except Exception as exc:  # e.g. options that no longer build
        raise UserError(f"{spec} is not a segpipe checkpoint ({exc.__class__.__name__}) (--model)") from None
    size = state.get("eval_size") or _run_eval_size(uri, state.get("mlflow_run_id"))
    return model.to(device).eval(), size, f"{spec} ({state['model_name']})"


def load_run_checkpoint(uri: str, run_id: str, what: str):
    """The model of a train run from its checkpoint artifact, loaded with weights_only=True (the run's
    pickled MLflow model is never unpickled: data never runs code) -> (eval-mode model, state)."""
    import tempfile

    from pipeline.tracking import CHECKPOINT_ARTIFACT, download_checkpoint
    from pipeline.stages.train import load_checkpoint_model

    with tempfile.TemporaryDirectory(prefix="segpipe-ckpt-") as tmp:
        path = download_checkpoint(uri, run_id, Path(tmp))
        if path is None:
            raise UserError(f"{what}: run {run_id} has no '{CHECKPOINT_ARTIFACT}' artifact (a run logged before "
                            "segpipe stored one): re-train it, or pass its models/<family>-seed<N>.pt (--model)")
        try:
            return load_checkpoint_model(path)
        except UserError as exc:
            raise UserError(f"{what}: {str(exc).replace(str(path), f'the checkpoint of run {run_id}')} (--model)") from None


# ------------------------------------------------------------------------------------ images


def expand(images: list[str]) -> list[Path]:
    """Files as given; a directory gives its image files (sorted)."""
    out: list[Path] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def read_image(path: Path, max_pixels: int | None = None):
    """uint8 tensor 3xHxW, or raises ValueError saying why it cannot be read. An image of more than
    max_pixels pixels is shrunk to fit that budget (aspect kept); a JPEG is decoded at reduced
    scale (libjpeg's DCT scaling, PIL's draft) so its full-size pixels never exist in memory.
    Decoding is bounded: a non-JPEG above DECODE_FACTOR x max_pixels is refused as too large."""
    import math
    import warnings

    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels and w * h > max_pixels:
                    bound = max_pixels * (64 if im.format == "JPEG" else DECODE_FACTOR)
                    if w * h > bound:
                        raise _TooLarge(f"too large: {w}x{h} is over {bound} pixels to decode (--max-pixels)")
                    s = math.sqrt(max_pixels / (w * h))
                    target = (max(1, int(w * s)), max(1, int(h * s)))
                    if im.format == "JPEG":
                        im.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale, still >= target
                    im.load()
                    rgb_im = im.convert("RGB")
                    if rgb_im.size != target:
                        rgb_im = rgb_im.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
                    rgb = np.asarray(rgb_im)
                else:
                    im.load()
                    rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("a directory") from None
    except UnidentifiedImageError:
        raise ValueError("not an image") from None
    except Image.DecompressionBombError:
        raise ValueError("too large") from None
    except _TooLarge:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"unreadable: {str(exc)[:80]}") from None
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError("empty image")
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


class _TooLarge(ValueError):
    pass


DECODE_FACTOR = 8  # non-JPEG images decode in full: at most this many times the pixel budget


def _save_rgb(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _original_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:  # header only
            return im.size
    except Exception:
        return None


def _classes_line(mask: np.ndarray) -> str:
    ids, counts = np.unique(mask, return_counts=True)
    total = mask.size
    parts = [(VOC_CLASSES[i], c / total) for i, c in zip(ids.tolist(), counts.tolist())
             if 0 < i < len(VOC_CLASSES) and c / total >= 0.0005]
    parts.sort(key=lambda x: -x[1])
    return ", ".join(f"{name} {100 * f:.1f}%" for name, f in parts) or "background only"


def predict(p: Params, model_spec: str, images: list[str], out: str | Path, size: int | None = None,
            device: str = "auto", progress: bool = True, max_pixels: int | None = None) -> dict:
    """Returns {"written": [(image, mask, overlay)], "failed": [(image, why)]}; raises UserError at the
    end when some images could not be read (after the others are written)."""
    import torch

    from pipeline.data.palette import save_mask_png
    from pipeline.reporting.figures import overlay, predict_mask

    from pipeline.config import MAX_SIDE, MAX_SIDE_REASON

    if size is not None and size < 16:
        raise UserError(f"size must be >= 16, got {size} (--size)")
    if size is not None and size > MAX_SIDE:
        raise UserError(f"size must be <= {MAX_SIDE}, got {size}: {MAX_SIDE_REASON} (--size)")
    max_pixels = p.predict.max_pixels if max_pixels is None else max_pixels
    if max_pixels < 4096:
        raise UserError(f"--max-pixels must be >= 4096 (a 64x64 image), got {max_pixels} (--max-pixels)")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device is visible (--device)")
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    files = expand(images)
    if not files:
        raise UserError(f"no image files in {', '.join(images)} (IMAGE)")
    model, run_size, desc = load_model(model_spec, p, dev)
    size = min(size or run_size or p.train.eval_size, MAX_SIDE)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out}: {exc.strerror} (--out)") from None
    say = print if progress else (lambda *a, **k: None)
    say(f"predict: {desc} at {size}x{size} on {dev.type}, {len(files)} image(s) -> {out}")
    written, failed, used = [], [], set()
    for f in files:
        try:
            image = read_image(f, max_pixels)
        except ValueError as exc:
            failed.append((str(f), str(exc)))
            continue
        shrunk = _original_size(f)
        if shrunk and shrunk != (image.shape[2], image.shape[1]):
            print(f"note: {f.name} is {shrunk[0]}x{shrunk[1]}, above the pixel budget {max_pixels} "
                  f"(--max-pixels): segmented and written at {image.shape[2]}x{image.shape[1]}", file=sys.stderr)
        mask = predict_mask(model, image, size)
        stem, n = f.stem, 2
        while stem in used:
            stem, n = f"{f.stem}-{n}", n + 1
        used.add(stem)
        mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
        save_mask_png(mask, mask_path)
        _save_rgb(overlay(image.permute(1, 2, 0).numpy(), mask), overlay_path)
        written.append((str(f), str(mask_path), str(overlay_path)))
        say(f"  {f.name}: {_classes_line(mask)} -> {mask_path.name}, {overlay_path.name}")
    if failed:
        raise UserError(f"{len(failed)} of {len(files)} images could not be read: "
                        + "; ".join(f"{name} ({why})" for name, why in failed)
                        + f" — the other {len(written)} were written to {out} (IMAGE)")
    return {"written": written, "failed": failed}


def run(_params, args) -> int:
    from pipeline.config import load_params

    # a checkpoint needs no params.yaml: without one (and no -p), the defaults give the tracking URI
    if Path(args.params).is_file() or args.params != "params.yaml":
        p = load_params(args.params, args.overrides)
    else:
        from pipeline.config import apply_overrides, validate

        p = validate(apply_overrides({}, args.overrides), "defaults with -S overrides")
    predict(p, args.model, args.images, args.out, size=args.size, device=args.device, progress=not args.quiet,
            max_pixels=args.max_pixels)
    return 0
