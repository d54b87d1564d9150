"""The registry as a table: parameters and GFLOPs per model (``segpipe models``, docs/models.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ._utils import count_params
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
