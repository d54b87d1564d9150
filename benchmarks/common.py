"""What every benchmark shares: the result table, goals, <out>/<what>.json (with machine info) and
bench.md, medians, scratch directories. stdlib + pipeline.system only: benchmarks/gpu_bench.py
(torch + pyyaml) imports it."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline.system import machine_info

WHAT = ("loader", "preprocess", "model", "ray", "pipeline", "gpu", "verify", "md")


def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def format_table(columns: list[str], rows: list[list]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(columns)]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line([str(h) for h in columns]), line(["-" * w for w in widths]), *map(line, cells)])


def goal(name: str, value: float, target: float | None, higher_is_better: bool = True) -> dict:
    """A figure and the goal it is held to (target None: a figure shown without a goal)."""
    met = None if target is None else bool(value >= target if higher_is_better else value <= target)
    return {"name": name, "value": round(value, 3), "target": target,
            "op": ">=" if higher_is_better else "<=", "met": met}


def goal_text(g: dict, md: bool = False) -> str:
    if g["target"] is None:
        return f"{g['value']:.3f}"
    verdict = "met" if g["met"] else ("**not met**" if md else "NOT met")
    return f"{g['value']:.3f} (goal {g['op']} {g['target']}: {verdict})"


def command_line(what: str) -> str:
    """`segpipe bench <what> ...` as it was typed (from sys.argv when it holds the bench call), less
    --out / --workdir (where results and scratch data went does not change them)."""
    argv = sys.argv[1:]
    if "bench" not in argv or what not in argv[argv.index("bench"):]:
        return f"segpipe bench {what}"
    rest, it = [], iter(argv[argv.index("bench") + 1:])
    for a in it:
        if a in ("--out", "--workdir"):
            next(it, None)
        elif not a.startswith(("--out=", "--workdir=")):
            rest.append(a)
    return "segpipe bench " + " ".join(rest)


RESULT_NAME: dict[str, str] = {}  # --name: the result file's name instead of <what>


def report(what: str, out: Path, columns: list[str], rows: list[list], goals: list[dict], settings: dict,
           notes: list[str], extra: dict | None = None, command: str | None = None, md: bool = True) -> dict:
    """Print the table + goals, write <out>/<what>.json atomically, rewrite bench.md beside <out>."""
    print()
    print(format_table(columns, rows))
    for g in goals:
        print(f"{g['name']}: {goal_text(g)}")
    for n in notes:
        print(f"note: {n}")
    name = RESULT_NAME.get("name") or what
    payload = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "command": command or command_line(what), "machine": machine_info(), "settings": settings,
               "table": {"columns": columns, "rows": rows}, "goals": goals, "notes": notes, **(extra or {})}
    write_json(out / f"{name}.json", payload)
    if md:
        write_markdown(out)
    print(f"wrote {out / f'{name}.json'}" + (f" and {out.parent / 'bench.md'}" if md else ""))
    return payload


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def write_markdown(out: Path, path: Path | None = None) -> Path:
    """bench.md (beside `out` unless `path`): every <what>.json in `out`, in a fixed order, as tables."""
    lines = ["# Benchmarks", "",
             f"Written by `segpipe bench <what>` from [{out.name}/]({out.name}/) (one JSON per benchmark, with the "
             "machine it ran on). Ratios compare runs measured in the same process, interleaved; on a shared "
             "machine absolute figures move, the ratios much less.", ""]
    extra = sorted(f.stem for f in out.glob("*.json") if f.stem not in WHAT) if out.is_dir() else []
    for what in [*WHAT, *extra]:
        src = out / f"{what}.json"
        if not src.is_file():
            continue
        try:
            d = json.loads(src.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        m = d.get("machine", {})
        where = m.get("gpu") or m.get("cpu", "?")
        lines += [f"## {what}", "",
                  f"`{d.get('command', 'segpipe bench ' + what)}` — {d.get('created', '?')}, {where}, "
                  f"{m.get('cpus_usable', m.get('cpu_count', '?'))} cores, torch {m.get('torch', '?')}, "
                  f"load {m.get('loadavg', '?')}", ""]
        t = d.get("table", {})
        cols = t.get("columns", [])
        if cols:
            lines.append("| " + " | ".join(cols) + " |")
            numeric = [all(isinstance(r[i], (int, float)) or r[i] in (None, "-") for r in t.get("rows", []) if i < len(r))
                       for i in range(len(cols))]
            lines.append("|" + "|".join("---:" if num else "---" for num in numeric) + "|")
            for r in t.get("rows", []):
                lines.append("| " + " | ".join(fmt(c) for c in r) + " |")
            lines.append("")
        for g in d.get("goals", []):
            lines.append(f"- **{g['name']}**: {goal_text(g, md=True)}")
        for n in d.get("notes", []):
            lines.append(f"- {n}")
        lines.append("")
    path = path or out.parent / "bench.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")

class Scratch:
    """--workdir or a temp dir removed at the end."""

    def __init__(self, workdir: str | None, prefix: str):
        self.keep = workdir is not None
        self.path = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix=f"segpipe-bench-{prefix}-"))
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc):
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)
