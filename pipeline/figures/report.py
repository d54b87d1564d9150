"""The figures of `segpipe report`: the comparison plots (:func:`draw` picks them from the report's
groups), the qualitative grid and the tune-trial panel. Colours per family come from seg_models'
FAMILIES."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from pipeline.data.palette import VOC_PALETTE, colorize
from pipeline.data.voc import NUM_CLASSES, VOC_CLASSES
from pipeline.figures import plt
from pipeline.figures.run import confusion_png
from seg_models.registry import FAMILIES


# ------------------------------------------------------------------ comparison figures (segpipe report)

FAMILY_COLORS = {name: fam.color for name, fam in FAMILIES.items()}
_EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def family_color(label: str, index: int = 0) -> str:
    return FAMILY_COLORS.get(label.split("/")[0], _EXTRA_COLORS[index % len(_EXTRA_COLORS)])


def comparison_grid(samples, predictions: dict[str, list[np.ndarray]], path: Path, title: str) -> Path | None:
    """Rows: the same val images; columns: image | ground truth | one prediction per label.

    samples: [(id, uint8 3xHxW or HxWx3 image, truth HxW)]; predictions: label -> one HxW mask
    per sample. One legend (VOC palette) for every class shown, under the grid."""
    if not samples:
        return None
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
    fig, ax = plt.subplots(figsize=(7.8, 4.6))
    for i, pt in enumerate(points):
        color = family_color(pt["label"], i)
        err = pt.get("yerr") or 0.0
        yerr = [[min(err, pt["y"])], [min(err, 1.0 - pt["y"])]]
        ax.errorbar(pt["x"], pt["y"], yerr=yerr, fmt="o", ms=8, capsize=4, color=color,
                    label=f"{pt['label']} (n={pt['n']} seed{'s' * (pt['n'] != 1)})")
    xs = [pt["x"] for pt in points if pt["x"] > 0]
    if xs and max(xs) / min(xs) > 20:
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


# --------------------------------------------------------------------- the figures of `segpipe report`

FIGURES = "figures"  # the report's figure folder, beside comparison.md


def _rel(path) -> str:
    return f"{FIGURES}/{Path(path).name}"


def _tradeoffs(groups, fig_dir: Path, dev_name: str) -> dict[str, str]:
    measured = [g for g in groups if "latency_ms" in g.measured and g.stat("mIoU")["mean"] is not None]
    if not measured:
        return {}
    pts = [{"label": g.family, "y": g.stat("mIoU")["mean"], "yerr": g.stat("mIoU")["std"], "n": len(g.runs)}
           for g in measured]
    size = measured[0].measured["size"]
    return {
        "miou_vs_params": _rel(tradeoff_png(
            [{**pt, "x": g.measured["params_M"]} for pt, g in zip(pts, measured)], "parameters (millions)",
            fig_dir / "miou_vs_params.png", "val mIoU vs model size")),
        "miou_vs_latency": _rel(tradeoff_png(
            [{**pt, "x": g.measured["latency_ms"]} for pt, g in zip(pts, measured)],
            f"latency (ms / image, batch 1, {size}×{size})",
            fig_dir / "miou_vs_latency.png", f"val mIoU vs latency\n{dev_name.split(' (torch')[0]}")),
    }


def _curves(groups, fig_dir: Path) -> dict[str, str]:
    curves = {}
    for g in groups:
        by_epoch: dict[int, list[float]] = {}
        for r in g.runs:
            for step, v in r.history.get("val/mIoU", []):
                by_epoch.setdefault(step, []).append(v)
        if by_epoch:
            ep = sorted(by_epoch)
            curves[g.family] = {"epochs": ep, "mean": [statistics.fmean(by_epoch[e]) for e in ep],
                                "lo": [min(by_epoch[e]) for e in ep], "hi": [max(by_epoch[e]) for e in ep], "n": len(g.runs)}
    if not curves:
        return {}
    return {"miou_per_epoch": _rel(curves_png(curves, fig_dir / "miou_per_epoch.png", "val mIoU per epoch"))}


def _per_class(groups, fig_dir: Path) -> dict[str, str]:
    per_class = {g.family: g.per_class() for g in groups}
    cms = [r.cm for g in groups for r in g.runs if r.cm is not None]
    if cms:  # the classes with ground-truth pixels in val (a class only ever predicted has IoU 0)
        in_val = sum(cms).sum(1) > 0
        classes = [c for i, c in enumerate(VOC_CLASSES) if in_val[i]]
        why = "absent from the val ground truth"
    else:
        classes = [c for c in VOC_CLASSES if any(pc[c] is not None for pc in per_class.values())]
        why = "absent from val and predictions"
    if not classes:
        return {}
    omitted = NUM_CLASSES - len(classes)
    return {"per_class_iou": _rel(per_class_png(
        classes, {f: [pc[c] for c in classes] for f, pc in per_class.items()}, fig_dir / "per_class_iou.png",
        "val IoU per class" + (f" ({omitted} classes {why} left out)" if omitted else "")))}


def _confusions(groups, fig_dir: Path) -> dict[str, str]:
    out = {}
    for g in groups:
        cms = [r.cm for r in g.runs if r.cm is not None]
        if cms:
            name = g.family if g.model == g.family else f"{g.family} ({g.model})"
            out[f"confusion_{g.family}"] = _rel(confusion_png(
                sum(cms), fig_dir / f"confusion_{g.family}.png",
                title=f"{name}: val confusion matrix, row-normalised\n"
                      + (f"(summed over {len(cms)} seeds)" if len(cms) > 1 else f"(seed {g.runs[0].seed})")))
    return out


def draw(groups, samples, predictions, trials, fig_dir: Path, dev_name: str) -> dict[str, str]:
    """Every PNG of the report into ``fig_dir`` (created); returns name -> path relative to the report.
    groups: pipeline.reporting.runs.Group (measured filled in); samples / predictions: the val images
    and each family's masks of them (qualitative grid); trials: tune trials (tracking.report.tune_trials)."""
    fig_dir.mkdir(parents=True)
    figs = {**_tradeoffs(groups, fig_dir, dev_name), **_curves(groups, fig_dir), **_per_class(groups, fig_dir),
            **_confusions(groups, fig_dir)}
    if samples and predictions:
        by = {g.family: g for g in groups}
        labelled = {f"{fam} (seed {by[fam].best.seed})\n{by[fam].model}": preds for fam, preds in predictions.items()}
        figs["qualitative"] = _rel(comparison_grid(samples, labelled, fig_dir / "qualitative.png",
                                                   "Same val images, every family's best run (VOC palette)"))
    knobs = sorted({k for t in trials for k in t["config"]})
    if knobs:
        figs["tune"] = _rel(tune_png(trials, knobs, fig_dir / "tune.png",
                                     f"Ray Tune trials: val mIoU per tuned setting ({len(trials)} trials)"))
    return figs


__all__ = ["FIGURES", "FAMILY_COLORS", "comparison_grid", "curves_png", "draw", "family_color",
           "per_class_png", "tradeoff_png", "tune_png"]
