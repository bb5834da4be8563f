"""How unevenly the experts' tokens land on the dies: the load model and EPLB.

The paper gives no expert-load distribution, so the load is an assumption: per MoE layer, expert
popularity follows Zipf(``ZIPF_S``) by rank (each layer with its own hot experts), which makes the
hottest of 256 experts ~3.7x the mean. ``eplb_imbalance`` places the deployment's expert slots with
``moe/eplb.py`` (redundant copies of the hottest experts, packed over the dies) and returns what is
left: the busiest die's tokens over the mean die's. "Perfect EPLB" is 1.0 by definition.
"""
from __future__ import annotations

import functools

from cloudmatrix.moe import eplb

ZIPF_S = 0.3          # assumption (docs/simulator.md): no paper figure for the expert-load skew
LOAD_LAYERS = 8       # layers sampled: each has its own hot experts; the imbalance is their mean
ROWS_PER_EXPERT = 4096  # routed rows per expert in the sample (large: sampling noise < 2%)


@functools.cache
def eplb_imbalance(dies: int, redundant: int, slots_per_die: int, experts: int = 256,
                   zipf_s: float = ZIPF_S) -> float:
    """Busiest die / mean die load after EPLB places ``experts + redundant`` expert copies on
    ``dies`` dies (at most ``slots_per_die`` each) for the Zipf load above."""
    if dies * slots_per_die < experts + redundant:
        raise ValueError(f"{dies} dies x {slots_per_die} slots cannot hold {experts} experts + {redundant} copies")
    counts = eplb.zipf_counts(LOAD_LAYERS, experts, experts * ROWS_PER_EXPERT, s=zipf_s, seed=0)  # [L, E]
    placement = eplb.balance(counts, dies, redundant, experts_per_die_cap=slots_per_die)
    return eplb.imbalance(placement, counts)
