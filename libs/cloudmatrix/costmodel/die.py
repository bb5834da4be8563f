"""The Ascend 910C die as the cost model sees it (figures from ../shared/PAPERS.md section 1).

An operator's modeled time is a roofline: max(FLOPs / peak, bytes moved / HBM bandwidth). This
module holds the ideal roofline only; operator efficiencies measured by the paper are applied by
the callers that know which operator they cost.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DieSpec:
    """One 910C die: 24 cube + 48 vector cores, 64 GB HBM."""

    fp16_flops: float = 376e12      # dense BF16/FP16 FLOP/s per die
    int8_ops: float = 752e12        # INT8 OP/s per die (derived in PAPERS.md)
    hbm_bytes: int = 64 * 10**9     # HBM capacity per die
    hbm_bandwidth: float = 1.6e12   # bytes/s per die


ASCEND_910C_DIE = DieSpec()


def roofline_s(flops: float, bytes_moved: float, peak: float, bandwidth: float) -> float:
    """Ideal time of one operator: bound by compute or by memory traffic, whichever is slower."""
    return max(flops / peak, bytes_moved / bandwidth)


def gemm_modeled_s(m: int, k: int, n: int, elem_bytes: int, die: DieSpec = ASCEND_910C_DIE) -> float:
    """[M, K] x [K, N] GEMM on the cube unit (fp16/bf16 inputs and output)."""
    flops = 2.0 * m * k * n
    bytes_moved = elem_bytes * (m * k + k * n + m * n)
    return roofline_s(flops, bytes_moved, die.fp16_flops, die.hbm_bandwidth)
