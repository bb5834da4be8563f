"""The Ascend 910C die as the cost model sees it (figures from ../shared/PAPERS.md section 1).

An operator's modeled time is a roofline: max(FLOPs / peak, bytes moved / HBM bandwidth).
`roofline_s` and `gemm_modeled_s` are the ideal roofline; `DieEfficiency` holds the fractions of
peak the paper measured for its operators (plus documented assumptions where it gives none), which
`costmodel.ops` applies. This package only models time; it never measures it.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DieSpec:
    """One 910C die: 24 cube + 48 vector cores, 64 GB HBM."""

    fp16_flops: float = 376e12      # dense BF16/FP16 FLOP/s per die (PAPERS.md s1)
    int8_ops: float = 752e12        # INT8 OP/s per die (PAPERS.md s1, derived)
    hbm_bytes: int = 64 * 10**9     # HBM capacity per die (PAPERS.md s1)
    hbm_bandwidth: float = 1.6e12   # bytes/s per die (PAPERS.md s1)


@dataclasses.dataclass(frozen=True)
class DieEfficiency:
    """Sustained fractions of the die's peaks, per operator kind, and the per-operator overhead."""

    mla_compute: float = 0.654      # MLA, compute-bound: 65.4% of peak FLOPS (PAPERS.md s2 Operators)
    mla_memory: float = 0.841       # MLA, memory-bound: 1,346 of 1,600 GB/s (PAPERS.md s2 Operators)
    int8_gemm: float = 0.8005       # INT8 GEMM: midpoint of 77.4-82.7% of peak (PAPERS.md s2 Operators)
    # Assumption: the paper gives no BF16/FP16 GEMM figure; it runs on the same cube cores with the
    # same tiling as INT8, so it is taken to reach the same fraction of its (half as high) peak.
    fp16_gemm: float = 0.8005
    # Assumption: the paper measures sustained HBM bandwidth only for MLA (84.1%); memory-bound
    # GEMMs (decode GEMVs) and vector ops (norms, activations, sampling) stream HBM the same way.
    stream_memory: float = 0.841
    # Assumption: no paper figure. Per-operator launch/dispatch cost on the NPU when the step runs
    # as a captured graph (CloudMatrix-Infer's decode does); a few microseconds is the usual order
    # for device-side task dispatch. Set to 0.0 for the pure roofline.
    launch_s: float = 2e-6


ASCEND_910C_DIE = DieSpec()
PAPER_EFFICIENCY = DieEfficiency()
# The bare roofline (every efficiency 1, no launch cost), for comparison with the modeled time.
IDEAL_EFFICIENCY = DieEfficiency(mla_compute=1.0, mla_memory=1.0, int8_gemm=1.0, fp16_gemm=1.0,
                                 stream_memory=1.0, launch_s=0.0)

# dtype -> (bytes per element, which peak the cube unit runs it at). Our "fp32" precision is a CPU
# accuracy choice; the NPU has no fp32 cube path worth modelling, so fp32 models as BF16 there.
DTYPES = {"int8": (1, "int8_ops"), "fp16": (2, "fp16_flops"), "bf16": (2, "fp16_flops"), "fp32": (2, "fp16_flops")}


def dtype_info(dtype: str, die: DieSpec = ASCEND_910C_DIE) -> tuple[int, float]:
    """(bytes per element, peak op/s) of a compute dtype on the die."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    elem, peak_field = DTYPES[dtype]
    return elem, getattr(die, peak_field)


def check_nonnegative(**values: float) -> None:
    """Raise ValueError naming the first argument that is negative."""
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def roofline_s(flops: float, bytes_moved: float, peak: float, bandwidth: float) -> float:
    """Ideal time of one operator: bound by compute or by memory traffic, whichever is slower."""
    return max(flops / peak, bytes_moved / bandwidth)


def gemm_modeled_s(m: int, k: int, n: int, elem_bytes: int, die: DieSpec = ASCEND_910C_DIE) -> float:
    """Ideal [M, K] x [K, N] GEMM on the cube unit (fp16/bf16 inputs and output), no efficiency."""
    flops = 2.0 * m * k * n
    bytes_moved = elem_bytes * (m * k + k * n + m * n)
    return roofline_s(flops, bytes_moved, die.fp16_flops, die.hbm_bandwidth)
