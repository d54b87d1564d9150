"""The one rule segpipe uses to call a difference of mean val mIoU real: it must be larger than the
spread of the seeds, the sum of the two sample standard deviations (the report's family comparison and
the tune's ablation tables both apply it)."""

from __future__ import annotations

from typing import Optional


def beyond_spread(gap: float, std_a: Optional[float], std_b: Optional[float]) -> tuple[str, Optional[float]]:
    """(verdict, spread) for a difference of means `gap` between two results with these seed stds
    (None: one seed). Verdicts: "one seed: spread unknown", "inside the seed spread", "larger than the
    seed spread"."""
    if std_a is None or std_b is None:
        return "one seed: spread unknown", None
    spread = std_a + std_b
    return ("inside the seed spread" if abs(gap) <= spread else "larger than the seed spread"), spread
