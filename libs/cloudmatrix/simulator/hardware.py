"""Hardware profiles for the second-system check (`cmx simulate --hardware`): Hopper GPUs from
their public specifications and operator benchmarks, and the expert-parallel rounds from DeepEP's
published kernels. Nothing here is fitted, and no constant comes from a system-level row
(docs/simulator-sources.md lists every figure with its source).

On a GPU the "die" of the cost model is the whole GPU, and its 1-byte GEMM peak (``int8_ops``)
is FP8's. The Ascend-specific calibrated constants are replaced by the H800's own operator
figures: FlashMLA for the MLA core, DeepGEMM for FP8 GEMMs, DeepEP for dispatch and combine. The
EPLB residual is the model's and its router's, not the hardware's: it carries over.
"""
from __future__ import annotations

import dataclasses
import math

from cloudmatrix.costmodel.die import DieEfficiency, DieSpec

# H100 SXM datasheet: 989 TFLOPS dense BF16, 1,979 dense FP8, 80 GB HBM3 at 3.35 TB/s. The H800
# SXM is the same GPU with less NVLink bandwidth (no official datasheet; DeepSeek's ISCA'25 paper
# and FlashMLA's deep-dive take these peaks).
HOPPER_SXM = DieSpec(fp16_flops=989e12, int8_ops=1979e12, hbm_bytes=80 * 10**9, hbm_bandwidth=3.35e12)

HOPPER_EFFICIENCY = DieEfficiency(
    mla_compute=660 / 989,       # FlashMLA (H800 SXM5, CUDA 12.8): 660 TFLOPS compute-bound
    mla_memory=3000 / 3350,      # FlashMLA: up to 3,000 GB/s memory-bound
    int8_gemm=1350 / 1979,       # DeepGEMM at its release (Feb 2025, the deployments' time): 1,350+ FP8 TFLOPS
    fp16_gemm=1350 / 1979,       # assumption: BF16 GEMMs reach the same share of their (half) peak
    stream_memory=3000 / 3350,   # assumption: streaming ops as FlashMLA's memory-bound figure
    launch_s=2e-6,               # assumption: a kernel in a CUDA graph (not fitted; the Ascend fit is not used)
)


@dataclasses.dataclass(frozen=True)
class DeepEpRounds:
    """Dispatch / combine time from DeepEP's published kernels: seconds per token per rank at
    each EP size (the benchmark's 128 tokens per rank, hidden 7,168, top-8, FP8 dispatch, BF16
    combine), interpolated in log(EP) and clamped; linear in tokens (the kernels run near the
    NIC's bandwidth at these sizes, which DeepEP reports beside each time)."""

    ep: tuple[int, ...]
    dispatch_us: tuple[float, ...]
    combine_us: tuple[float, ...]
    tokens: int = 128

    def round_s(self, kind: str, tokens_per_rank: float, ep: int) -> float:
        times = {"dispatch": self.dispatch_us, "combine": self.combine_us}[kind]
        return _log_interp(ep, self.ep, times) * 1e-6 * tokens_per_rank / self.tokens


@dataclasses.dataclass(frozen=True)
class DeepEpNormal:
    """Normal-mode (prefill) rounds: the RDMA bottleneck bandwidth DeepEP reports by EP size, for
    the rows a rank sends to or receives from other nodes."""

    ep: tuple[int, ...]
    dispatch_gbps: tuple[float, ...]
    combine_gbps: tuple[float, ...]

    def round_s(self, kind: str, nbytes: float, ep: int) -> float:
        gbps = {"dispatch": self.dispatch_gbps, "combine": self.combine_gbps}[kind]
        return nbytes / (_log_interp(ep, self.ep, gbps) * 1e9)


# DeepEP README, low-latency kernels, all RDMA (first release): H800 with one 400 Gb/s CX7 per GPU.
DEEPEP_LOW_LATENCY = DeepEpRounds(ep=(8, 16, 32, 64, 128, 256),
                                  dispatch_us=(163, 173, 182, 186, 192, 194),
                                  combine_us=(318, 329, 350, 353, 369, 360))
# DeepEP README, normal kernels over RDMA (EP16-64; EP8 runs over NVLink alone).
DEEPEP_NORMAL = DeepEpNormal(ep=(16, 32, 64), dispatch_gbps=(43, 58, 51), combine_gbps=(43, 57, 50))
# sgl-project/sgl-kernel-npu README (DeepEP-Ascend on the A3 SuperPOD = CloudMatrix384), normal
# kernels, 4,096 tokens per rank, hidden 7,168, top-8, INT8 dispatch, BF16 combine: bottleneck GB/s.
DEEPEP_ASCEND_NORMAL = DeepEpNormal(ep=(8, 16, 32, 64, 128), dispatch_gbps=(146, 107, 102, 81, 57),
                                    combine_gbps=(125, 103, 95, 91, 81))
FP8_ROW_BYTES = 7168 + 7168 // 128 * 4   # FP8 hidden + one fp32 scale per 128 channels (DeepSeek-V3's tiles)
BF16_ROW_BYTES = 2 * 7168


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    die: DieSpec
    eff: DieEfficiency
    description: str


HARDWARE = {
    "h800": Hardware("h800", HOPPER_SXM, HOPPER_EFFICIENCY, "H800 SXM (Hopper): 989 / 1,979 TFLOPS BF16 / FP8, "
                     "3.35 TB/s; DeepEP over 400 Gb/s RDMA per GPU"),
    "h100": Hardware("h100", HOPPER_SXM, HOPPER_EFFICIENCY, "H100 SXM: as the H800, with more NVLink bandwidth "
                     "(unused by the RDMA kernels modeled)"),
}


def _log_interp(x: float, xs: tuple[int, ...], ys: tuple[float, ...]) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    raise AssertionError("unreachable")
