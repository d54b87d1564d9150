"""`segpipe predict`'s work: load a model (a checkpoint file, or a train run's checkpoint artifact
behind models:/ / runs:/), read images within a pixel budget, segment them and write
<name>_mask.png (palette PNG) and <name>_overlay.png. The report loads its models here too."""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline import storage
from pipeline.config import MAX_SIDE, MAX_SIDE_REASON, Params
from pipeline.data.palette import save_mask_png
from pipeline.data.voc import VOC_CLASSES
from pipeline.errors import UserError
from pipeline.data.palette import overlay
from pipeline.training.inference import predict_mask
from pipeline.system import pick_device
from pipeline.tracking import CHECKPOINT_ARTIFACT, download_checkpoint, rehome_store, resolve_tracking_uri
from pipeline.tracking.report import registry_run_id, run_eval_size, store_exists

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
DECODE_FACTOR = 8  # non-JPEG images decode in full: at most this many times the pixel budget


def _load_checkpoint_model(path):
    # the checkpoint format is train's (torch.load weights_only=True inside: data never runs code)
    from pipeline.training.checkpoint import load_checkpoint_model

    return load_checkpoint_model(path)


# ------------------------------------------------------------------------------------- model


def load_run_checkpoint(uri: str, run_id: str, what: str):
    """The model of a train run from its checkpoint artifact, loaded with weights_only=True (the run's
    pickled MLflow model is never unpickled: data never runs code) -> (eval-mode model, state)."""
    with tempfile.TemporaryDirectory(prefix="segpipe-ckpt-") as tmp:
        path = download_checkpoint(uri, run_id, Path(tmp))
        if path is None:
            raise UserError(f"{what}: run {run_id} has no '{CHECKPOINT_ARTIFACT}' artifact (a run logged before "
                            "segpipe stored one): re-train it, or pass its models/<family>-seed<N>.pt (--model)")
        try:
            return _load_checkpoint_model(path)
        except UserError as exc:
            raise UserError(f"{what}: {str(exc).replace(str(path), f'the checkpoint of run {run_id}')} (--model)") from None


def load_model(spec: str, p: Params, device) -> tuple[object, int | None, str]:
    """(eval-mode model on device, eval size of its run or None, description)."""
    uri = resolve_tracking_uri(p.mlflow.tracking_uri)
    if spec.startswith(("models:/", "runs:/")):
        if not store_exists(uri):
            raise UserError(f"no MLflow store at {uri[len('sqlite:///'):]}: cannot resolve {spec} (mlflow.tracking_uri)")
        rehome_store(uri)  # a moved checkout: the store's artifact locations follow it
        run_id = registry_run_id(uri, spec) if spec.startswith("models:/") else spec[len("runs:/"):].split("/")[0]
        if not run_id:
            raise UserError(f"cannot resolve {spec} in {uri}: no such registered model / version; `segpipe report` "
                            "registers segpipe-<family>@best (--model)")
        model, state = load_run_checkpoint(uri, run_id, spec)
        return model.to(device).eval(), state.get("eval_size") or run_eval_size(uri, run_id), spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"no such checkpoint: {spec} (give models/<family>-seed<N>.pt or "
                        "models:/segpipe-<family>@best) (--model)")
    try:
        model, state = _load_checkpoint_model(path)  # torch.load(weights_only=True): data never runs code
    except UserError as exc:
        raise UserError(f"{exc} (--model)") from None
    except Exception as exc:  # e.g. options that no longer build
        raise UserError(f"{spec} is not a segpipe checkpoint ({exc.__class__.__name__}) (--model)") from None
    size = state.get("eval_size") or run_eval_size(uri, state.get("mlflow_run_id"))
    return model.to(device).eval(), size, f"{spec} ({state['model_name']})"


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


class _TooLarge(ValueError):
    pass


def _decode(im, max_pixels: int | None) -> np.ndarray:
    """An opened PIL image as HxWx3 uint8, shrunk to the pixel budget (JPEG: decoded at reduced scale)."""
    w, h = im.size
    if not max_pixels or w * h <= max_pixels:
        im.load()
        return np.asarray(im.convert("RGB"))
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
    return np.asarray(rgb_im)


def read_image(path: Path, max_pixels: int | None = None):
    """uint8 tensor 3xHxW, or raises ValueError saying why it cannot be read. An image of more than
    max_pixels pixels is shrunk to fit that budget (aspect kept); a JPEG is decoded at reduced
    scale (libjpeg's DCT scaling, PIL's draft) so its full-size pixels never exist in memory.
    Decoding is bounded: a non-JPEG above DECODE_FACTOR x max_pixels is refused as too large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                rgb = _decode(im, max_pixels)
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


def _save_rgb(arr: np.ndarray, path: Path) -> None:
    with storage.atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _original_size(path: Path) -> tuple[int, int] | None:
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


# ----------------------------------------------------------------------------------- predict


def _check(p: Params, size: int | None, max_pixels: int | None, device: str, images: list[str]):
    """The inputs checked before any model loads -> (max_pixels, torch device, image files)."""
    if size is not None and size < 16:
        raise UserError(f"size must be >= 16, got {size} (--size)")
    if size is not None and size > MAX_SIDE:
        raise UserError(f"size must be <= {MAX_SIDE}, got {size}: {MAX_SIDE_REASON} (--size)")
    max_pixels = p.predict.max_pixels if max_pixels is None else max_pixels
    if max_pixels < 4096:
        raise UserError(f"--max-pixels must be >= 4096 (a 64x64 image), got {max_pixels} (--max-pixels)")
    dev = pick_device(device, "--device")
    files = expand(images)
    if not files:
        raise UserError(f"no image files in {', '.join(images)} (IMAGE)")
    return max_pixels, dev, files


def _segment_one(model, f: Path, image, size: int, max_pixels: int, out: Path, used: set) -> tuple[str, str, str, str]:
    """Segment one read image (file ``f``) and write its mask and overlay -> (image, mask, overlay,
    classes line)."""
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
    return str(f), str(mask_path), str(overlay_path), _classes_line(mask)


def predict(p: Params, model_spec: str, images: list[str], out: str | Path, size: int | None = None,
            device: str = "auto", progress: bool = True, max_pixels: int | None = None) -> dict:
    """Returns {"written": [(image, mask, overlay)], "failed": [(image, why)]}; raises UserError at the
    end when some images could not be read (after the others are written)."""
    max_pixels, dev, files = _check(p, size, max_pixels, device, images)
    model, run_size, desc = load_model(model_spec, p, dev)
    size = min(size or run_size or p.train.eval_size, MAX_SIDE)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out}: {exc.strerror} (--out)") from None
    say = log.info if progress else (lambda *a, **k: None)
    say(f"predict: {desc} at {size}x{size} on {dev.type}, {len(files)} image(s) -> {out}")
    written, failed, used = [], [], set()
    for f in files:
        try:
            image = read_image(f, max_pixels)
        except ValueError as exc:
            failed.append((str(f), str(exc)))
            continue
        name, mask_path, overlay_path, classes = _segment_one(model, f, image, size, max_pixels, out, used)
        written.append((name, mask_path, overlay_path))
        say(f"  {f.name}: {classes} -> {Path(mask_path).name}, {Path(overlay_path).name}")
    if failed:
        raise UserError(f"{len(failed)} of {len(files)} images could not be read: "
                        + "; ".join(f"{name} ({why})" for name, why in failed)
                        + f" — the other {len(written)} were written to {out} (IMAGE)")
    return {"written": written, "failed": failed}
