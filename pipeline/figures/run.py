"""The figures of one training run, logged to its MLflow run: the val confusion matrix and the
prediction grid (drawn from arrays; the model is run by :mod:`pipeline.training.inference`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.patches import Patch

from pipeline.data.palette import VOC_PALETTE, colorize
from pipeline.data.voc import NUM_CLASSES, VOC_CLASSES
from pipeline.figures import plt

__all__ = ["confusion_png", "prediction_grid"]


def confusion_png(cm, path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (recall per true class) with class names on both axes."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    norm[rows[:, 0] == 0] = np.nan  # no pixel of this true class: drawn grey, not as "all wrong"
    fig, ax = plt.subplots(figsize=(9, 8))
    cmap = plt.get_cmap("Blues").with_extremes(bad="0.85")
    im = ax.imshow(norm, cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks(range(len(VOC_CLASSES)), VOC_CLASSES, rotation=90, fontsize=8)
    ax.set_yticks(range(len(VOC_CLASSES)), VOC_CLASSES, fontsize=8)
    ax.set_xlabel("predicted class" + ("\n(grey rows: no pixel of that class in the ground truth)"
                                       if (rows == 0).any() else ""))
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's pixels")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _legend(ax, classes: set[int]) -> None:
    pal = np.asarray(VOC_PALETTE).reshape(-1, 3) / 255.0
    handles = [Patch(color=pal[c], label=VOC_CLASSES[c] if c < NUM_CLASSES else "void") for c in sorted(classes)]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def prediction_grid(rows, path: Path, title: str) -> Path | None:
    """image | truth | prediction rows, VOC palette, legend of the classes shown. rows: (id, uint8
    HxWx3 image, truth HxW, prediction HxW), as :func:`pipeline.training.inference.predict_images`
    returns them."""
    if not rows:
        return None
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
