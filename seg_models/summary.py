"""The registry as a table: parameters and GFLOPs per model (``segpipe models``, docs/models.md), and
what each DeepLabV3 ASPP sees at a crop (``segpipe models --crop N``)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ._utils import count_params
from .geometry import aspp_geometry
from .registry import build_model, list_models, model_info


def _flops(model: torch.nn.Module, size: int, device: str) -> int:
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size, device=device))
    return counter.get_total_flops()


def model_table(size: int = 520) -> list[dict[str, Any]]:
    """One row per model with its defaults: name, family, params, gflops (batch 1, size x size, eval
    mode, ``FlopCounterMode``'s count / 1e9; it counts a multiply-add as 2 FLOPs), options.

    Models are built on the meta device, so nothing is allocated or computed: shapes are enough."""
    rows = []
    for name in list_models():
        with torch.device("meta"):
            model = build_model(name)
        info = model_info(name)
        rows.append({"name": name, "family": info["family"], "params": count_params(model),
                     "gflops": round(_flops(model, size, "meta") / 1e9, 2), "options": list(info["options"])})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table (aligned, so it also reads as plain text)."""
    header = ["model", "family", "params (M)", "GFLOPs", "options"]
    cells = [[r["name"], r["family"], f"{r['params'] / 1e6:.2f}", f"{r['gflops']:.1f}", ", ".join(r["options"])]
             for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *cells)]
    numeric = {2, 3}

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if i in numeric else v.ljust(w)
                                 for i, (v, w) in enumerate(zip(values, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *map(line, cells)])


DEGENERATE = " = 1x1 conv at this crop"  # a branch whose rate reaches the feature-map side


def aspp_lines(crop_size: int) -> list[str]:
    """What the ASPP of every model that has one sees at a ``crop_size`` square crop, at its default
    options and each output stride it takes: the feature-map side, and per atrous branch its rate and
    field of view (``aspp_geometry``), degenerate branches marked ``= 1x1 conv at this crop``."""
    lines = [f"ASPP at a {crop_size} x {crop_size} crop, default rates; field = (2 rate + 1) x output stride px "
             "(the span of a 3x3 atrous conv's taps); a rate >= the feature-map side leaves only the centre tap"]
    for name in list_models():
        strides = model_info(name)["options"].get("output_stride")
        for stride in strides or [None]:
            geometry = aspp_geometry(name, crop_size, **({"output_stride": stride} if stride else {}))
            if geometry is None:
                continue
            side = geometry["feature_size"]
            lines.append(f"{name}, output stride {geometry['output_stride']}: feature map {side} x {side}, "
                         f"1x1 branch {geometry['output_stride']} px, image pooling "
                         f"{'on' if geometry['image_pooling'] else 'off'}")
            lines += [f"  rate {b['rate']}: field {b['field_px']} px" + DEGENERATE * b["degenerate"]
                      for b in geometry["branches"]]
    return lines


def aspp_note(name: str, crop_size: int, options: dict[str, Any] | None = None) -> str | None:
    """One line on what this model's ASPP sees at a ``crop_size`` crop (None without an ASPP): the
    feature-map side and each branch's field of view, degenerate branches marked."""
    geometry = aspp_geometry(name, crop_size, **(options or {}))
    if geometry is None:
        return None
    side = geometry["feature_size"]
    branches = ", ".join(f"rate {b['rate']}: field {b['field_px']} px" + DEGENERATE * b["degenerate"]
                         for b in geometry["branches"])
    return (f"ASPP at a {crop_size} px crop, output stride {geometry['output_stride']}: feature map {side} x {side}; "
            f"{branches}; image pooling {'on' if geometry['image_pooling'] else 'off'}")


def model_cost(name: str, size: int, options: dict[str, Any] | None = None) -> dict[str, float]:
    """{"params", "gflops"} of one model with these options at a ``size`` x ``size`` input (batch 1,
    eval mode, built on the meta device: nothing allocated or computed)."""
    with torch.device("meta"):
        model = build_model(name, **(options or {}))
    return {"params": float(count_params(model)), "gflops": round(_flops(model, size, "meta") / 1e9, 4)}
