"""Measured and modeled seconds per phase -> ``cmx.common.v1.Timing``, the same way everywhere."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from cmx.common.v1 import common_pb2


def timing_proto(measured: Mapping[str, float], modeled: Mapping[str, float], *, measured_s: float,
                 modeled_s: float, phases: Iterable[str] | None = None) -> common_pb2.Timing:
    """Totals as given; one PhaseTiming per phase (default: every phase named, but "total", sorted)."""
    names = phases if phases is not None else sorted((set(measured) | set(modeled)) - {"total"})
    return common_pb2.Timing(measured_s=measured_s, modeled_s=modeled_s, phases=[
        common_pb2.PhaseTiming(phase=p, measured_s=measured.get(p, 0.0), modeled_s=modeled.get(p, 0.0))
        for p in names])
