"""Percentiles, and the median of several runs with its spread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/p99/max in milliseconds of latencies given in seconds, and how many."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "max": round(max(ms), 3) if ms else math.nan,
    }


def across_runs(runs: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """For each key: the median over runs and the spread ``[min, max]`` (NaN-free values only)."""
    out: dict[str, Any] = {}
    for key in keys:
        vals = [float(r[key]) for r in runs if key in r and not math.isnan(float(r[key]))]
        if not vals:
            out[key] = {"median": math.nan, "min": math.nan, "max": math.nan, "runs": 0}
            continue
        out[key] = {
            "median": round(statistics.median(vals), 3),
            "min": round(min(vals), 3),
            "max": round(max(vals), 3),
            "runs": len(vals),
        }
    return out
