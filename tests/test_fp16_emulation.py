"""The fp16 cube-unit emulation against an fp64 reference of the same rounding."""
from __future__ import annotations

import torch

from cloudmatrix.kernels.fp16 import (
    FP16_MAX,
    cube_matmul,
    cube_matmul_reference,
    to_fp16,
)


def test_cube_matmul_matches_fp64_reference_on_random_data():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 33, 70, generator=gen) * 4, torch.randn(3, 70, 17, generator=gen) * 4
    got, ref = cube_matmul(a, b), cube_matmul_reference(a, b)
    assert got.dtype == torch.float32
    # fp32 accumulation order differs from fp64: at most one fp16 ulp apart.
    ulp = torch.finfo(torch.float16).eps * ref.abs().clamp_min(2 ** -14)
    assert ((got - ref).abs() <= ulp).all()
    assert torch.equal(got, to_fp16(got))  # every output is an fp16 value


def test_overflow_becomes_inf_like_the_hardware():
    a = torch.full((1, 4), 200.0)
    b = torch.full((4, 1), 100.0)  # 4 * 200 * 100 = 80000 > 65504
    assert torch.isinf(cube_matmul(a, b)).all()
    assert cube_matmul(a, b / 2).item() == 40000.0 and 40000.0 < FP16_MAX
