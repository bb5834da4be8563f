"""PASA flash attention against the fp64 reference; fp16 overflow behaviour; the beta solver."""
from __future__ import annotations

import math

import pytest
import torch

from cloudmatrix.kernels.fp16 import to_fp16
from cloudmatrix.kernels.pasa import MODES, attention_reference, flash_attention
from cloudmatrix.kernels.pasa_beta import DEFAULT_BETA, effective_beta, solve_beta

FP16_MODES = ("fp16-naive", "pasa", "pasa-hybrid")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal(gen, *shape, mean=0.0, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype) + mean


def _uniform(gen, *shape, mean, amplitude):
    """The paper's distribution: (U - 0.5) * 2 * Am + mean."""
    return (torch.rand(*shape, generator=gen) - 0.5) * 2 * amplitude + mean


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _rmse_rel(out, ref):
    return ((out.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


# name: (B, Hq, Hkv, Sq, Sk, Dqk, Dv, scale, causal, tile_q, tile_kv)
EXACT_CASES = {
    "square-causal-gqa": (2, 4, 2, 203, 203, 32, 32, 32**-0.5, True, 64, 64),
    "square-full-gqa": (2, 4, 2, 203, 203, 32, 32, 32**-0.5, False, 64, 64),
    "mla-decode-mqa": (2, 8, 1, 1, 300, 72, 64, 48**-0.5, True, 128, 128),
    "chunked-prefill": (1, 6, 3, 37, 300, 40, 24, 40**-0.5, True, 16, 64),
    "cross-lengths": (1, 2, 1, 130, 77, 16, 16, 0.3, False, 128, 128),
}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_fp64_pasa_equals_reference_under_large_bias(case):
    b, hq, hkv, sq, sk, dqk, dv, scale, causal, tq, tk = EXACT_CASES[case]
    gen = _gen(len(case))
    q, k = _normal(gen, b, hq, sq, dqk, mean=30.0), _normal(gen, b, hkv, sk, dqk, mean=30.0)
    v = _normal(gen, b, hkv, sk, dv, mean=1.0)
    ref = attention_reference(q, k, v, scale=scale, causal=causal)
    out = flash_attention(q, k, v, scale=scale, mode="fp64", causal=causal, tile_q=tq, tile_kv=tk)
    assert out.dtype == torch.float64 and out.shape == (b, hq, sq, dv)
    assert _rel(out, ref) <= 1e-10


def _padding_mask(lengths: list[int], sq: int, sk: int) -> torch.Tensor:
    keys = torch.arange(sk)[None, None, :]
    return (keys < torch.tensor(lengths)[:, None, None]).expand(len(lengths), sq, sk).clone()


def test_fp64_exact_with_padding_mask_garbage_keys_and_fully_masked_row():
    b, hq, hkv, sq, sk, d = 3, 4, 2, 70, 203, 32
    gen = _gen(7)
    q, k, v = _normal(gen, b, hq, sq, d, mean=30.0), _normal(gen, b, hkv, sk, d, mean=30.0), _normal(gen, b, hkv, sk, d)
    mask = _padding_mask([203, 150, 1], sq, sk)
    k[1, :, 150:] = 1000.0  # padded keys hold garbage: the shift sees them, the result must not
    mask[0, 9, :] = False  # a query with nothing to attend
    for causal in (False, True):
        ref = attention_reference(q, k, v, scale=d**-0.5, causal=causal, mask=mask)
        out = flash_attention(q, k, v, scale=d**-0.5, mode="fp64", causal=causal, mask=mask, tile_q=32, tile_kv=64)
        assert _rel(out, ref) <= 1e-10
        assert torch.all(out[0, :, 9] == 0)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_masks_garbage_keys_gives_zeros_for_fully_masked_rows_never_nan(mode):
    b, hq, hkv, sq, sk, d = 2, 4, 1, 40, 150, 64
    gen = _gen(11)
    q, k, v = (_uniform(gen, b, h, s, d, mean=2.0, amplitude=1.0) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    mask = _padding_mask([150, 90], sq, sk)
    k[1, :, 90:] = 1000.0  # garbage past the sequence end: the shift must not follow it
    mask[1, :3] = False
    mask[0, 20, 100:] = False
    out = flash_attention(q, k, v, scale=d**-0.5, mode=mode, causal=True, mask=mask, tile_q=16, tile_kv=64)
    ref = attention_reference(q, k, v, scale=d**-0.5, causal=True, mask=mask)
    assert torch.isfinite(out).all()
    assert torch.all(out[1, :, :3] == 0)
    assert _rmse_rel(out, ref) < 5e-3


def test_mean30_fp16_naive_overflows_while_pasa_stays_finite_and_close():
    b, hq, hkv, s, d = 1, 4, 1, 200, 128
    gen = _gen(3)
    q = _uniform(gen, b, hq, s, d, mean=30.0, amplitude=0.5)
    k, v = (_uniform(gen, b, hkv, s, d, mean=30.0, amplitude=0.5) for _ in range(2))
    ref = attention_reference(q, k, v, scale=d**-0.5)
    naive = flash_attention(q, k, v, scale=d**-0.5, mode="fp16-naive")
    assert (~torch.isfinite(naive)).sum() > 0
    for mode in ("pasa", "pasa-hybrid"):
        out = flash_attention(q, k, v, scale=d**-0.5, mode=mode)
        assert torch.isfinite(out).all(), mode
        assert _rmse_rel(out, ref) < 5e-3, mode


def test_hybrid_statistics_are_more_accurate_than_pure_fp16_pasa():
    b, hq, hkv, s, d = 1, 4, 2, 300, 64
    gen = _gen(5)
    q = _uniform(gen, b, hq, s, d, mean=10.0, amplitude=0.5)
    k, v = (_uniform(gen, b, hkv, s, d, mean=10.0, amplitude=0.5) for _ in range(2))
    ref = attention_reference(q, k, v, scale=d**-0.5, causal=True)
    pure = flash_attention(q, k, v, scale=d**-0.5, mode="pasa", causal=True)
    hybrid = flash_attention(q, k, v, scale=d**-0.5, mode="pasa-hybrid", causal=True)
    assert _rmse_rel(hybrid, ref) < 0.8 * _rmse_rel(pure, ref)


def test_fp32_mode_matches_reference():
    gen = _gen(9)
    q, k, v = _normal(gen, 2, 4, 150, 64), _normal(gen, 2, 2, 150, 64), _normal(gen, 2, 2, 150, 48)
    for causal in (False, True):
        ref = attention_reference(q, k, v, scale=0.125, causal=causal)
        out = flash_attention(q, k, v, scale=0.125, mode="fp32", causal=causal, tile_q=64, tile_kv=64)
        assert out.dtype == torch.float32
        assert _rel(out, ref) < 2e-6


@pytest.mark.parametrize("mode", FP16_MODES)
def test_fp16_modes_return_fp16_representable_float32(mode):
    gen = _gen(13)
    q, k, v = _normal(gen, 1, 2, 33, 16), _normal(gen, 1, 1, 50, 16), _normal(gen, 1, 1, 50, 16)
    out = flash_attention(q, k, v, scale=0.25, mode=mode)
    assert out.dtype == torch.float32 and torch.equal(to_fp16(out), out)


@pytest.mark.parametrize("start, expected", [
    (1 - 2**-4, 0.9375),            # already a fixed point
    (1 - 2**-5, 0.968994140625),    # one iteration
    (1 - 2**-6, 0.9844970703125),   # one iteration: the reference code's constant
])
def test_solve_beta_reproduces_the_paper_fixed_points(start, expected):
    beta = solve_beta(128, start=start)
    assert beta == expected
    assert effective_beta(beta, 128) == beta  # a fixed point: the rounded M implies beta itself
    assert DEFAULT_BETA == 0.9844970703125


def test_solve_beta_fixed_points_depend_on_start_and_scale():
    assert solve_beta(128, start=0.99) == 0.9903106689453125
    scaled = solve_beta(128, start=1 - 2**-6, scale=128**-0.5)
    assert scaled != DEFAULT_BETA and abs(effective_beta(scaled, 128, 128**-0.5) - scaled) <= 1e-15
    with pytest.raises(ValueError):
        solve_beta(128, start=1.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "fp8"}, "unknown mode"),
    ({"mode": "pasa", "beta": 1.0}, "beta"),
    ({"mode": "pasa", "causal": True, "q_len": 9}, "Sk >= Sq"),
    ({"mode": "pasa", "heads": 3}, "multiple"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    kwargs = dict(kwargs)
    q_len, heads = kwargs.pop("q_len", 4), kwargs.pop("heads", 4)
    gen = _gen(1)
    q, k, v = _normal(gen, 1, heads, q_len, 8), _normal(gen, 1, 2, 8, 8), _normal(gen, 1, 2, 8, 8)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, scale=math.sqrt(1 / 8), **kwargs)


@pytest.mark.parametrize("seed", range(3))
def test_the_rank_one_shift_equals_the_shift_gemm(seed):
    from cloudmatrix.kernels.fp16 import cube_matmul
    from cloudmatrix.kernels.pasa import apply_shift
    from cloudmatrix.kernels.pasa_beta import shift_matrix

    g = torch.Generator().manual_seed(seed)
    k5 = torch.randn(2, 1, 3, 128, 72, generator=g) * 30 + 5  # [B, H, tiles, n, D], biased like real keys
    for mode in ("pasa", "pasa-hybrid"):
        m = shift_matrix(128, 0.98, 0.1, torch.float32)
        got, gemm = apply_shift(m, k5, MODES[mode]), cube_matmul(m, k5)
        ulp = torch.finfo(torch.float16).eps * gemm.abs().clamp_min(2 ** -14)
        assert ((got - gemm).abs() <= ulp + 2 ** -22).all()  # the last fp16 bit (near 0: subnormal quanta)
        assert (got == gemm).float().mean() > 0.99
    m64, k64 = shift_matrix(128, 0.98, 0.1, torch.float64), k5.double()
    assert torch.allclose(apply_shift(m64, k64, MODES["fp64"]), m64 @ k64, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("mode", ["pasa", "pasa-hybrid", "fp16-naive"])
def test_a_short_row_gets_the_same_bits_beside_a_longer_one(mode):
    """A decode query of a 100-key sequence batched with a 200-key one (whose second KV tile it may
    not attend) gets exactly what it gets alone: a tile with no key a row may attend leaves its
    sum and output as they were (what exact greedy decoding in a batch, MTP's included, rests on)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 1, 32, generator=gen)
    k, v = torch.randn(2, 1, 200, 32, generator=gen) * 3, torch.randn(2, 1, 200, 32, generator=gen)
    mask = torch.arange(200)[None, None, :] < torch.tensor([100, 200])[:, None, None]  # [2, 1, 200]
    together = flash_attention(q, k, v, scale=0.2, mode=mode, mask=mask)
    alone = flash_attention(q[:1], k[:1, :, :100], v[:1, :, :100], scale=0.2, mode=mode)
    assert torch.equal(together[:1], alone)
