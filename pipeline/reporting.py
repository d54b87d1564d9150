"""Figures shared by train (MLflow artifacts) and report: confusion matrix and prediction grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.palette import VOC_PALETTE
from pipeline.voc import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colorize(mask: np.ndarray) -> np.ndarray:
    """HxW class ids (255 = void) -> HxWx3 uint8 in the VOC palette (void drawn in its cream)."""
    pal = np.asarray(VOC_PALETTE, dtype=np.uint8).reshape(-1, 3)
    return pal[mask.astype(np.int64).clip(0, 255)]


def confusion_png(cm, path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (recall per true class) with class names on both axes."""
    plt = _plt()
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(VOC_CLASSES)), VOC_CLASSES, rotation=90, fontsize=8)
    ax.set_yticks(range(len(VOC_CLASSES)), VOC_CLASSES, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's pixels")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _legend(ax, classes: set[int]) -> None:
    from matplotlib.patches import Patch

    pal = np.asarray(VOC_PALETTE).reshape(-1, 3) / 255.0
    handles = [Patch(color=pal[c], label=VOC_CLASSES[c] if c < NUM_CLASSES else "void") for c in sorted(classes)]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def predict_images(model, data_dir, eval_size: int, count: int):
    """The first `count` val images: (id, uint8 HxWx3 image, truth HxW, prediction HxW)."""
    import torch

    from pipeline.data import ShardDataset, decode_image, decode_mask, eval_transform

    raw = ShardDataset(data_dir, "val")
    tf = eval_transform(eval_size)
    out = []
    model.eval()
    for i in range(min(count, len(raw))):
        sid, img_b, mask_b = raw.raw(i)
        from torchvision import tv_tensors

        image, mask = decode_image(img_b), decode_mask(mask_b)
        x, _ = tf(tv_tensors.Image(image), tv_tensors.Mask(mask))
        with torch.no_grad():
            logits = model(x.unsqueeze(0))["out"][0]
        h, w = image.shape[-2:]
        scale = min(1.0, eval_size / max(h, w))
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        pred = logits[:, :sh, :sw].unsqueeze(0)
        pred = torch.nn.functional.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)
        out.append((sid, image.permute(1, 2, 0).numpy(), mask.numpy(), pred.numpy().astype(np.uint8)))
    return out


def prediction_grid(model, data_dir, eval_size: int, count: int, path: Path, title: str) -> Path | None:
    """image | truth | prediction rows, VOC palette, legend of the classes shown."""
    rows = predict_images(model, data_dir, eval_size, count)
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 3, figsize=(9.5, 3 * len(rows)), squeeze=False)
    for r, (sid, img, truth, pred) in enumerate(rows):
        for c, (arr, name) in enumerate(((img, sid), (colorize(truth), "truth"), (colorize(pred), "prediction"))):
            axes[r][c].imshow(arr)
            axes[r][c].set_title(name, fontsize=9)
            axes[r][c].axis("off")
        _legend(axes[r][2], set(np.unique(truth).tolist()) | set(np.unique(pred).tolist()))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


__all__ = ["colorize", "confusion_png", "prediction_grid", "predict_images", "IGNORE_INDEX"]
