"""How unevenly the experts' rows land on the dies in one step.

Two factors, multiplied:

- **The placement's residual** (``DecodeSetup.imbalance``, ``PrefillSetup.imbalance``): the
  busiest die's expected load over the mean die's after EPLB placed the expert copies for the
  load it measured. 1.0 is perfect EPLB; the default EPLB's residual is a calibrated constant
  (``calibration.EPLB_RESIDUAL``), bounded by the trained router's measured skew.
- **The step's fluctuation** (``step_fluctuation``): even with every die's expected load equal,
  the rows of one step are a sample, and the busiest die of many gets more than its mean. Derived
  from the rows per die, no constant: it matters in decode at small batches (x1.34 at 8 sequences
  per NPU with MTP, x1.10 at 96) and not in prefill (16,384 tokens per NPU: x1.01).
"""
from __future__ import annotations

import functools
import math
from statistics import NormalDist


@functools.cache
def expected_max_normal(n: int) -> float:
    """E[max of n standard normals], Blom's approximation (within ~1% for n of 2 to 1,000)."""
    return NormalDist().inv_cdf((n - 0.375) / (n + 0.25)) if n >= 2 else 0.0


def step_fluctuation(mean_rows: float, dies: int) -> float:
    """Busiest / mean rows over ``dies`` expert dies whose expected load is ``mean_rows`` each, when
    the step's rows are drawn independently (Poisson counts in the normal approximation): a lower
    bound, since the tokens of one sequence tend to pick the same experts."""
    if dies < 2 or mean_rows <= 0:
        return 1.0
    return 1.0 + expected_max_normal(dies) / math.sqrt(mean_rows)
