"""Emulating the Ascend cube and vector units' fp16 arithmetic on a CPU.

fp16 matmul on these CPUs is ~500x slower than fp32, so the cube unit is emulated exactly: round the
GEMM inputs to fp16, multiply-accumulate in fp32 (a product of two fp16 values is exact in fp32),
round the result to fp16. Values past 65504 become inf, as on the hardware. Vector ops compute in
fp32 and round every result to fp16.

Shape legend: M, K, N = GEMM dims.
"""
from __future__ import annotations

import torch

FP16_MAX = 65504.0


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value, returned as fp32 (overflow -> +-inf)."""
    return x.to(torch.float16).to(torch.float32)


def cube_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp16 x fp16 -> fp32 accumulate -> fp16 output. a: [..., M, K], b: [..., K, N] -> [..., M, N] (fp32 dtype)."""
    return to_fp16(torch.matmul(to_fp16(a), to_fp16(b)))


def cube_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same rounding, written the slow obvious way: fp64 products of fp16-rounded inputs."""
    a16, b16 = to_fp16(a).double(), to_fp16(b).double()
    return to_fp16(torch.einsum("...mk,...kn->...mn", a16, b16).float())
