"""The plots of `segpipe tune` (<reports_dir>/tune/<family>/plots/ and the parent run's plots/), drawn
from the trial rows of pipeline.tuning.results and its search space (a ``pipeline.tuning.space.Space``,
read by attribute: family, info, searched). Which plots: one `miou_vs_<entry>.png` per searched
entry; `miou_by_rates_stride.png` (atrous_rates x output_stride, a panel per aspp) when atrous_rates
or output_stride is searched; `miou_by_upsample.png` (best trial per upsampling method, grouped by
variant or model) when upsample is searched. Chosen by what is searched, never by family name;
colours and variant names from seg_models.FAMILIES."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.display import show
from pipeline.figures import plt
from seg_models import model_info

MARKERS = (("completed", "o"), ("early_stopped", "x"))


def option(r: dict, name: str):
    """The value a trial ran with: its own, the family's, or the model's default."""
    if name in r["options"]:
        return r["options"][name]
    info = model_info(r["model"])
    if name not in info["options"]:
        return "fixed"  # e.g. MobileNetV3 DeepLabV3 has no output_stride option
    return info["defaults"][name]


def make_plots(rows: list[dict], space, outdir: Path) -> list[Path]:
    done = [r for r in rows if r["val_mIoU"] is not None]
    color = space.info.color or None
    paths = [_versus(plt, done, space, hp, kind, arg, color, outdir / f"miou_vs_{hp}.png")
             for hp, (kind, arg) in space.searched.items()]
    if done and {"atrous_rates", "output_stride"} & set(space.searched):
        paths.append(_heatmap(plt, done, space.family, outdir / "miou_by_rates_stride.png"))
    if done and "upsample" in space.searched:
        paths.append(_upsample_bars(plt, done, space, outdir / "miou_by_upsample.png"))
    return paths


def _versus(plt, done: list[dict], space, hp: str, kind: str, arg, color, path: Path) -> Path:
    """val mIoU of each trial against one searched entry (a log axis for loguniform; categories with
    the best trial per value joined for choices and grids)."""
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    if kind in ("uniform", "loguniform"):
        for status, marker in MARKERS:
            pts = [(r["values"][hp], r["val_mIoU"]) for r in done if r["status"] == status]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=40, color=color, label=status.replace("_", " "))
        if kind == "loguniform":
            ax.set_xscale("log")
    else:
        cats = [show(v) for v in arg]
        cats += sorted({show(r["values"][hp]) for r in done} - set(cats))  # n/a: cascade has no rates
        for status, marker in MARKERS:
            pts = [(cats.index(show(r["values"][hp])), r["val_mIoU"]) for r in done if r["status"] == status]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=40, color=color, label=status.replace("_", " "))
        best = [max((r["val_mIoU"] for r in done if show(r["values"][hp]) == c), default=float("nan")) for c in cats]
        ax.plot(range(len(cats)), best, "-", color="0.6", lw=1, zorder=0, label="best per value")
        ax.set_xticks(range(len(cats)), cats, rotation=20 if len(cats) > 3 else 0)
    ax.set_xlabel(hp)
    ax.set_ylabel("val mIoU (last epoch of the trial)")
    ax.set_title(f"{space.family}: val mIoU vs {hp}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _rates_of(r: dict) -> str:
    v = option(r, "atrous_rates")
    if v is None:  # cascade: no ASPP; parallel: the paper's rates for the output stride
        return "n/a (cascade)" if option(r, "aspp") == "cascade" else "default"
    return show(v)


def _order(label: str):
    nums = [int(x) for x in label.strip("()").split(",") if x.strip().isdigit()]
    return (0, nums) if nums else (1, [label])


def _heatmap(plt, rows: list[dict], family: str, path: Path) -> Path:
    """Best val mIoU per atrous_rates x output_stride cell, one panel per aspp."""
    rates = sorted({_rates_of(r) for r in rows}, key=_order)
    strides = sorted({show(option(r, "output_stride")) for r in rows}, key=_order)
    aspps = sorted({show(option(r, "aspp")) for r in rows})
    fig, axes = plt.subplots(1, len(aspps), squeeze=False,
                             figsize=(max(6.0, 2.6 + 1.5 * len(strides) * len(aspps)), 1.8 + 0.55 * len(rates)))
    vmax = max(0.05, max(r["val_mIoU"] for r in rows))
    for ax, aspp in zip(axes[0], aspps):
        grid = np.full((len(rates), len(strides)), np.nan)
        for r in rows:
            if show(option(r, "aspp")) == aspp:
                i, j = rates.index(_rates_of(r)), strides.index(show(option(r, "output_stride")))
                grid[i, j] = np.nanmax([grid[i, j], r["val_mIoU"]])
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        for i in range(len(rates)):
            for j in range(len(strides)):
                v = grid[i, j]
                ax.text(j, i, "-" if np.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=9,
                        color="0.4" if np.isnan(v) else ("k" if v > 0.6 * vmax else "w"))
        ax.set_xticks(range(len(strides)), strides)
        ax.set_yticks(range(len(rates)), rates)
        ax.set_xlabel("output_stride")
        ax.set_ylabel("atrous_rates")
        if aspp not in ("fixed", "n/a"):
            ax.set_title(f"aspp = {aspp}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.04)
    fig.suptitle(f"{family}: best val mIoU by atrous_rates x output_stride", fontsize=10)
    return _save(plt, fig, path)


def _upsample_bars(plt, rows: list[dict], space, path: Path) -> Path:
    """Best val mIoU per upsampling method, one bar per variant (a family with named variants) or model."""
    info = space.info
    names = {m: v for v, m in info.variants.items()}  # registry name -> variant (fcn8s_vgg16 -> 8s)
    by_variant = any(r["model"] in names for r in rows)

    def group(r: dict) -> str:
        return names.get(r["model"], r["model"]) if by_variant else r["model"]

    methods = [m for m in ("bilinear", "transposed", "unpool") if any(option(r, "upsample") == m for r in rows)] or ["n/a"]
    groups = sorted({group(r) for r in rows}, key=lambda g: (len(g), g))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(methods) * max(1, len(groups) / 2), 4.2))
    for k, g in enumerate(groups):
        mine = [r for r in rows if group(r) == g]
        best = [max((r["val_mIoU"] for r in mine if option(r, "upsample") == m), default=np.nan) for m in methods]
        xs = np.arange(len(methods)) - 0.4 + width * (k + 0.5)
        label = f"{info.display}-{g}" if by_variant and g in info.variants else g
        alpha = 0.8 if len(groups) == 1 else 0.35 + 0.55 * k / (len(groups) - 1)
        ax.bar(xs, best, width, label=label, alpha=alpha, color=info.color or None, edgecolor="0.3")
        for r in mine:
            if option(r, "upsample") in methods:
                x = xs[methods.index(option(r, "upsample"))]
                ax.scatter([x], [r["val_mIoU"]], color="k", s=12, marker="x" if r["status"] == "early_stopped" else "o",
                           zorder=3)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlabel("upsampling method")
    ax.set_ylabel("val mIoU")
    ax.text(0.99, 0.01, "bar: best trial; dots: trials (x: stopped early)", transform=ax.transAxes, ha="right",
            va="bottom", fontsize=7, color="0.35")
    ax.set_title(f"{space.family}: val mIoU by upsampling method"
                 + (f" and {info.display} variant" if by_variant else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def ablation_plot(result: dict, family: str, space, path: Path) -> Path:
    """The architecture phase's answer: one panel per searched axis, a bar per value at its mean val
    mIoU over the seeds with a ± std error bar, each seed's value as a dot; the configured value hatched."""
    axes = list(result["axes"].items())
    widths = [max(2, len(t)) for _, t in axes]
    fig, panels = plt.subplots(1, len(axes), squeeze=False, figsize=(1.6 + 1.2 * sum(widths), 4.2),
                               gridspec_kw={"width_ratios": widths})
    color = space.info.color or "C0"
    for ax, (axis, table) in zip(panels[0], axes):
        for i, r in enumerate(table):
            if r["mean"] is None:
                continue
            ax.bar(i, r["mean"], 0.7, color=color, alpha=0.55, edgecolor="0.3", hatch="//" if r["configured"] else None,
                   yerr=r["std"] or 0, capsize=4)
            ax.scatter([i] * len(r.get("mIoUs", [])), r.get("mIoUs", []), color="k", s=12, zorder=3)
            if r["verdict"].startswith(("better", "worse")):
                ax.text(i, r["mean"] + (r["std"] or 0), "*", ha="center", va="bottom", fontsize=12)
        ax.set_xticks(range(len(table)), [show(r["value"]) for r in table], rotation=20 if len(table) > 3 else 0,
                      fontsize=8)
        ax.set_title(axis, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    panels[0][0].set_ylabel("val mIoU, mean ± std over seeds")
    fig.suptitle(f"{family}: ablation (hatched: configured; dots: seeds; *: beyond the seed spread)", fontsize=10)
    return _save(plt, fig, path)
