"""The answer of the architecture phase: one ablation table per searched axis, like the tables of the
DeepLabV3 paper. For each value of an axis, the grid point that differs from the family's configured
point on that axis only: its val mIoU (on the selection split) mean ± std over the seeds, its
difference to the configured value, the verdict against the seed spread, its parameters and GFLOPs.

A value is adopted only when it beats the configured value beyond the seed spread (the report's rule,
pipeline.stats.beyond_spread); otherwise the configured value stays and a note says so.
"""

from __future__ import annotations

import statistics
from typing import Any

from pipeline.display import show
from pipeline.stats import beyond_spread
from pipeline.tuning.phases import axes, configured, point_key, values_of


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def point_stats(rows: list[dict]) -> dict[str, dict]:
    """point key -> {point, n, mean, std, seeds, mIoUs} over the trials that ended with a val mIoU."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["status"] == "error" or r["val_mIoU"] is None:
            continue
        key = point_key(r["point"])
        s = out.setdefault(key, {"point": r["point"], "seeds": [], "mIoUs": []})
        s["seeds"].append(r["seed"])
        s["mIoUs"].append(r["val_mIoU"])
    for s in out.values():
        s.update(_stats(s["mIoUs"]))
    return out


def tables(space, rows: list[dict], costs: dict[str, dict] | None = None) -> dict:
    """{"configured": point, "axes": {axis: [row per value]}, "chosen": point, "notes": [...]}.

    A row: value, n, mean, std, delta (to the configured value), spread (std + configured std),
    verdict (better / worse beyond the seed spread, inside the seed spread, or unknown with one seed),
    params, gflops (costs: point key -> {params, gflops}), configured (bool)."""
    costs = costs or {}
    base = configured(space)
    stats = point_stats(rows)
    ref = stats.get(point_key(base))
    out: dict[str, Any] = {"configured": base, "axes": {}, "chosen": dict(base), "notes": []}
    for axis, values in axes(space).items():
        table = []
        for v in values:
            point = {**base, axis: v}
            s = stats.get(point_key(point), _stats([]))
            row = {"value": v, "n": s["n"], "mean": s["mean"], "std": s["std"], "mIoUs": s.get("mIoUs", []),
                   "configured": point_key(point) == point_key(base), **costs.get(point_key(point), {})}
            row.update(_verdict(s, ref, row["configured"]))
            table.append(row)
        out["axes"][axis] = table
        better = [r for r in table if r["verdict"] == "better beyond the seed spread"]
        if better:
            win = max(better, key=lambda r: r["mean"])
            out["chosen"][axis] = win["value"]
            out["notes"].append(f"{axis}: {show(win['value'])} beats the configured {show(base[axis])} beyond the "
                                f"seed spread (+{win['delta']:.3f} mIoU): adopted")
        else:
            out["notes"].append(f"{axis}: no value beats the configured {show(base[axis])} beyond the seed "
                                "spread: kept")
    chosen = stats.get(point_key(out["chosen"]))
    out["chosen_mean"] = chosen["mean"] if chosen else None
    out["chosen_std"] = chosen["std"] if chosen else None
    out["chosen_n"] = chosen["n"] if chosen else 0
    return out


def _verdict(s: dict, ref: dict | None, is_ref: bool) -> dict:
    if is_ref:
        return {"delta": 0.0 if s["mean"] is not None else None, "spread": None, "verdict": "configured"}
    if s["mean"] is None or ref is None or ref["mean"] is None:
        return {"delta": None, "spread": None, "verdict": "no result"}
    delta = s["mean"] - ref["mean"]
    if 0.0 in (s["std"], ref["std"]):  # two seeds that score exactly alike: a model that learnt nothing seed-specific
        return {"delta": delta, "spread": 0.0, "verdict": "seeds identical: no spread to judge by"}
    verdict, spread = beyond_spread(delta, s["std"], ref["std"])
    if verdict == "larger than the seed spread":
        verdict = "better beyond the seed spread" if delta > 0 else "worse beyond the seed spread"
    return {"delta": delta, "spread": spread, "verdict": verdict}


def chosen_values(space, result: dict) -> dict:
    """The searched values of the adopted point, only on the axes that changed (what --apply merges)."""
    base, chosen = result["configured"], result["chosen"]
    changed = {a: v for a, v in chosen.items() if point_key({a: v}) != point_key({a: base[a]})}
    if not changed:
        return {}
    full = values_of(space, chosen)
    keep = set()
    for a in changed:
        keep |= set(a.split("+"))
    return {n: v for n, v in full.items() if n in keep}


def markdown(family: str, result: dict) -> list[str]:
    """The tables as markdown lines (the report and ablation.md)."""
    L = []
    for axis, table in result["axes"].items():
        L += [f"**{family}: {axis}** (configured: {show(result['configured'][axis])})", "",
              "| value | seeds | val mIoU (mean ± std) | Δ vs configured | verdict | params (M) | GFLOPs |",
              "|---|---:|---:|---:|---|---:|---:|"]
        for r in table:
            m = "–" if r["mean"] is None else f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if r["std"] is not None else "")
            d = "–" if r["delta"] is None or r["configured"] else f"{r['delta']:+.3f}"
            pm = f"{r['params'] / 1e6:.2f}" if r.get("params") is not None else "–"
            gf = f"{r['gflops']:.2f}" if r.get("gflops") is not None else "–"
            L.append(f"| {show(r['value'])}{' (configured)' if r['configured'] else ''} | {r['n']} | {m} | {d} | "
                     f"{r['verdict']} | {pm} | {gf} |")
        L.append("")
    L += [f"- {n}" for n in result["notes"]] + [""]
    return L


def compact(result: dict, limit: int = 7900) -> str:
    """The tables as compact JSON for a run tag (MLflow keeps at most 8000 characters): costs and
    notes are dropped first if it would not fit."""
    import json

    text = json.dumps(result, separators=(",", ":"), default=str)
    if len(text) <= limit:
        return text
    slim = {**result, "notes": [], "axes": {a: [{k: r.get(k) for k in ("value", "n", "mean", "std", "delta", "verdict",
                                                                       "configured", "mIoUs")} for r in t]
                                            for a, t in result["axes"].items()}}
    text = json.dumps(slim, separators=(",", ":"), default=str)
    return text if len(text) <= limit else json.dumps({"truncated": True, "configured": result["configured"],
                                                       "chosen": result["chosen"]}, default=str)
