"""Latency summaries shared by the serving benchmark and the request-level simulator: the mean
and percentiles (p50, p90, p99) of a list of seconds, in milliseconds."""
from __future__ import annotations

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: list[float]) -> dict[str, float]:
    """Milliseconds: mean and percentiles."""
    out = {"mean_ms": sum(values) / len(values) * 1e3 if values else 0.0}
    out.update({f"p{p}_ms": percentile(values, p) * 1e3 for p in PERCENTILES})
    return out
