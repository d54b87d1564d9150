"""How a value is shown to people, in one place: tune tables and plots, `--apply`'s change list,
MLflow params of best configs."""

from __future__ import annotations

from typing import Any

__all__ = ["show"]


def show(v: Any) -> str:
    """A value as people read it: (6, 12, 18), 0.0123, parallel, n/a (None: does not apply)."""
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(show(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
