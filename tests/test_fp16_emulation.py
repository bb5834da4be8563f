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


def test_fp16_tensor_ops_round_like_the_vector_unit():
    """PASA's fp16 modes hold vector values as fp16 tensors and rely on torch computing each fp16
    op in fp32 and rounding the result once: exactly to_fp16(op(fp32 values)), bit for bit,
    overflow to inf included, for every op the kernel uses (reductions along the last dim)."""
    gen = torch.Generator().manual_seed(5)
    for shape in [(1, 1, 4, 1), (1, 2, 8, 128), (2, 1, 36, 77), (1, 1, 3, 1000)]:
        a = to_fp16(torch.randn(shape, generator=gen) * 300)
        b = to_fp16(torch.randn(shape[:-1] + (1,), generator=gen) * 300)  # broadcast like the row statistics
        c = to_fp16(torch.rand(shape, generator=gen) + 0.5)
        ha, hb, hc = a.half(), b.half(), c.half()
        pairs = {
            "sub": (a - b, ha - hb), "add": (a + b, ha + hb), "mul": (a * b, ha * hb), "div": (a / c, ha / hc),
            "exp": (torch.exp((a - b) / 64), torch.exp((ha - hb) / 64)),
            "sum": (a.sum(-1, keepdim=True), ha.sum(-1, keepdim=True)),
            "mean": (a.mean(-1, keepdim=True), ha.mean(-1, keepdim=True)),
        }
        for name, (wide, half) in pairs.items():
            if name == "exp":  # its input went through two rounded ops on the fp16 side
                wide = torch.exp(to_fp16(to_fp16(a - b) / 64))
            assert torch.equal(to_fp16(wide), half.float()), (name, shape)
