"""Figures shared by train (MLflow artifacts), report and predict: confusion matrix, prediction grids,
overlays and the comparison plots of `segpipe report`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.palette import VOC_PALETTE
from pipeline.data.voc import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES


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
    from matplotlib.patches import Patch

    pal = np.asarray(VOC_PALETTE).reshape(-1, 3) / 255.0
    handles = [Patch(color=pal[c], label=VOC_CLASSES[c] if c < NUM_CLASSES else "void") for c in sorted(classes)]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def predict_mask(model, image, eval_size: int) -> np.ndarray:
    """One image (uint8 tensor 3xHxW) -> predicted class ids HxW uint8 at the image's own size.

    The image goes through the eval transform (shrink to fit eval_size, pad to a square); the
    logits of the unpadded part are resized back to HxW before the argmax."""
    import torch
    from torchvision import tv_tensors

    from pipeline.data.transforms import eval_transform

    h, w = image.shape[-2:]
    x, _ = eval_transform(eval_size)(tv_tensors.Image(image), tv_tensors.Mask(torch.zeros(h, w, dtype=torch.uint8)))
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(x.unsqueeze(0).to(device))["out"][0].float()
    scale = min(1.0, eval_size / max(h, w))
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    pred = logits[:, :sh, :sw].unsqueeze(0)
    pred = torch.nn.functional.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)
    return pred.cpu().numpy().astype(np.uint8)


def val_samples(data_dir, count: int):
    """The first `count` val images of the shards: (id, uint8 3xHxW image tensor, truth HxW array)."""
    from pipeline.data.loaders import ShardDataset, decode_image, decode_mask

    raw = ShardDataset(data_dir, "val")
    out = []
    for i in range(min(count, len(raw))):
        sid, img_b, mask_b = raw.raw(i)
        out.append((sid, decode_image(img_b), decode_mask(mask_b).numpy()))
    return out


def predict_images(model, data_dir, eval_size: int, count: int):
    """The first `count` val images: (id, uint8 HxWx3 image, truth HxW, prediction HxW)."""
    model.eval()
    return [(sid, image.permute(1, 2, 0).numpy(), truth, predict_mask(model, image, eval_size))
            for sid, image, truth in val_samples(data_dir, count)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """HxWx3 uint8 image with the non-background, non-void classes of `mask` blended in."""
    out = image.astype(np.float32).copy()
    sel = (mask != 0) & (mask != IGNORE_INDEX)
    out[sel] = (1 - alpha) * out[sel] + alpha * colorize(mask)[sel].astype(np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


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


# ------------------------------------------------------------------ comparison figures (segpipe report)

FAMILY_COLORS = {"fcn": "#1f77b4", "deeplabv3": "#ff7f0e", "lraspp": "#2ca02c", "unet": "#d62728"}
_EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def family_color(label: str, index: int = 0) -> str:
    return FAMILY_COLORS.get(label.split("/")[0], _EXTRA_COLORS[index % len(_EXTRA_COLORS)])


def comparison_grid(samples, predictions: dict[str, list[np.ndarray]], path: Path, title: str) -> Path | None:
    """Rows: the same val images; columns: image | ground truth | one prediction per label.

    samples: [(id, uint8 3xHxW or HxWx3 image, truth HxW)]; predictions: label -> one HxW mask
    per sample. One legend (VOC palette) for every class shown, under the grid."""
    if not samples:
        return None
    plt = _plt()
    labels = list(predictions)
    ncols, nrows = 2 + len(labels), len(samples)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.3 * nrows + 1.3), squeeze=False)
    shown: set[int] = set()
    for r, (sid, img, truth) in enumerate(samples):
        img = np.asarray(img)
        if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
            img = img.transpose(1, 2, 0)
        cells = [(img, "image"), (colorize(truth), "ground truth")]
        cells += [(colorize(predictions[lab][r]), lab) for lab in labels]
        shown |= set(np.unique(truth).tolist())
        for lab in labels:
            shown |= set(np.unique(predictions[lab][r]).tolist())
        for c, (arr, name) in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(arr, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
        axes[r][0].set_ylabel(sid, fontsize=8)
    from matplotlib.patches import Patch

    pal = np.asarray(VOC_PALETTE).reshape(-1, 3) / 255.0
    handles = [Patch(facecolor=pal[c], edgecolor="0.5", label=VOC_CLASSES[c] if c < NUM_CLASSES else "void")
               for c in sorted(shown)]
    fig.suptitle(title, fontsize=11)
    ncol = min(len(handles), 8)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False, title="VOC classes",
               title_fontsize=8)
    legend_in = 0.45 + 0.2 * ((len(handles) + ncol - 1) // ncol)
    fig.tight_layout(rect=(0, legend_in / (2.3 * nrows + 1.3), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tradeoff_png(points: list[dict], xlabel: str, path: Path, title: str) -> Path:
    """val mIoU (mean, error bar = std over seeds, clipped to [0, 1]) against a cost, one point per
    family; points: label, x, y, yerr (None for one seed), n. Log x when the costs span > 20x."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.8, 4.6))
    for i, pt in enumerate(points):
        color = family_color(pt["label"], i)
        err = pt.get("yerr") or 0.0
        yerr = [[min(err, pt["y"])], [min(err, 1.0 - pt["y"])]]
        ax.errorbar(pt["x"], pt["y"], yerr=yerr, fmt="o", ms=8, capsize=4, color=color,
                    label=f"{pt['label']} (n={pt['n']} seed{'s' * (pt['n'] != 1)})")
    xs = [pt["x"] for pt in points if pt["x"] > 0]
    if xs and max(xs) / min(xs) > 20:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 2, max(xs) * 2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    elif xs:
        ax.set_xlim(0, max(xs) * 1.25)
    top = max((pt["y"] + (pt.get("yerr") or 0.0) for pt in points), default=1.0)
    ax.set_ylim(0, min(1.0, max(0.05, top * 1.15)) + 0.03)  # headroom: a marker at 1.0 stays whole
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val mIoU (mean ± std over seeds)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_png(curves: dict[str, dict], path: Path, title: str) -> Path:
    """val mIoU per epoch per label: mean line, band = min..max over seeds. curves: label -> {epochs,
    mean, lo, hi, n}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    max_epoch = 1
    for i, (label, c) in enumerate(curves.items()):
        color = family_color(label, i)
        ax.plot(c["epochs"], c["mean"], marker="o", ms=4, color=color, label=f"{label} (n={c['n']})")
        if c["n"] > 1:
            ax.fill_between(c["epochs"], c["lo"], c["hi"], color=color, alpha=0.18, linewidth=0)
        max_epoch = max(max_epoch, max(c["epochs"], default=1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mIoU")
    if max_epoch <= 20:
        ax.set_xticks(range(1, max_epoch + 1))
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    several = any(c["n"] > 1 for c in curves.values())
    ax.legend(fontsize=8, title="mean over seeds,\nband = min..max" if several else "one seed each", title_fontsize=8,
              loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_class_png(classes: list[str], values: dict[str, list[float | None]], path: Path, title: str) -> Path:
    """Grouped bars: IoU per class (x) per label (colour); None = no value (class absent)."""
    plt = _plt()
    labels = list(values)
    n = max(1, len(labels))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(15.0, max(6.5, 0.3 * len(classes) * n + 2)), 4.8))
    x = np.arange(len(classes))
    for i, label in enumerate(labels):
        ys = [np.nan if v is None else v for v in values[label]]
        ax.bar(x - 0.4 + width * (i + 0.5), ys, width, label=label, color=family_color(label, i))
    ax.set_xticks(x, classes, rotation=45, ha="right", fontsize=9)
    ax.set_ylabel("val IoU (mean over seeds)")
    ax.set_ylim(0, 1.0)
    ax.set_xlim(-0.6, len(classes) - 0.4)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tune_png(trials: list[dict], knobs: list[str], path: Path, title: str) -> Path:
    """One panel per tuned knob: each trial's val mIoU against the knob's value, one colour per
    family. trials: {label, config: {knob: value}, mIoU}."""
    plt = _plt()
    n = max(1, len(knobs))
    ncols, nrows = min(3, n), (n + 2) // 3
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.4 * ncols + 1.3, 3.7 * nrows + 0.3), squeeze=False, sharey=True)
    axes = [[ax for row in grid for ax in row]]
    for ax in axes[0][n:]:
        ax.set_visible(False)
    labels = sorted({t["label"] for t in trials})
    def plain(v):  # lists (atrous rates, ...) are categories
        return str(v) if isinstance(v, (list, tuple, dict)) else v

    trials = [{**t, "config": {k: plain(v) for k, v in t["config"].items()}} for t in trials]
    for k, knob in enumerate(knobs):
        ax = axes[0][k]
        values = [t["config"].get(knob) for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
        distinct = {v for v in values if v is not None}
        if numeric and all(isinstance(v, int) for v in distinct) and len(distinct) <= 8:
            numeric = False  # a few integer choices (batch size, ...): one column each
        cats = sorted(distinct, key=lambda v: (str(type(v)), v if numeric or isinstance(v, (int, float)) else str(v)))
        cats = [str(v) for v in cats] if not numeric else []
        for i, label in enumerate(labels):
            pts = [(t["config"].get(knob), t["mIoU"]) for t in trials if t["label"] == label and t["config"].get(knob) is not None]
            if not pts:
                continue
            shift = 0.0 if numeric else (i - (len(labels) - 1) / 2) * 0.12  # families side by side
            xs = [v if numeric else cats.index(str(v)) + shift for v, _ in pts]
            ax.scatter(xs, [y for _, y in pts], s=36, color=family_color(label, i), label=label, alpha=0.85,
                       edgecolor="white", linewidth=0.5)
        if numeric:
            vals = [v for v in values if v is not None]
            if vals and min(vals) > 0 and max(vals) / min(vals) >= 20:
                ax.set_xscale("log")
        else:
            long = max((len(c) for c in cats), default=0) > 6
            ax.set_xticks(range(len(cats)), cats, rotation=30 if long else 0, ha="right" if long else "center", fontsize=8)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.set_xlabel(knob)
        ax.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel("trial val mIoU")
    handles, lbls = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in lbls:
                handles.append(h)
                lbls.append(lab)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.2 / (4.4 * ncols + 1.3), 1))
    if handles:
        fig.legend(handles, lbls, fontsize=8, loc="center right", title="family", title_fontsize=8,
                   bbox_to_anchor=(1 - 0.1 / (4.4 * ncols + 1.3), 0.5))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["colorize", "confusion_png", "prediction_grid", "predict_images", "predict_mask", "val_samples", "overlay",
           "comparison_grid", "tradeoff_png", "curves_png", "per_class_png", "tune_png", "family_color", "IGNORE_INDEX"]
