"""INT8 W8A8 primitives, smoothing, clipping and Int8Linear against exact references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cloudmatrix.quant.linear import Int8Linear
from cloudmatrix.quant.primitives import (
    MAX_K,
    QMAX,
    dequantize_rows,
    int8_matmul,
    int8_matmul_fallback,
    int8_matmul_int_mm,
    int_mm_applies,
    quantize_tokens,
    quantize_weight,
    w8a8_linear,
)
from cloudmatrix.quant.smooth import (
    CLIP_GRID,
    clip_errors,
    search_clip,
    smoothing_factors,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=_gen(seed), dtype=torch.int8)


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The obviously correct reference: int64 products and sums.
    return (a.long() @ b.long().t()).to(torch.int32)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def _reference_rows(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    # Row by row, the way the scheme is written down: q = round(x / (amax / 127)), clamped.
    rows = []
    for row, m in zip(x.float(), amax.float()):
        scale = m / QMAX if m > 0 else torch.tensor(1.0)
        rows.append(torch.clamp(torch.round(row / scale), -QMAX, QMAX))
    return torch.stack(rows).to(torch.int8)


def test_quantize_weight_per_channel_matches_reference_and_error_bound():
    w = torch.randn(48, 40, generator=_gen(1)) * torch.logspace(-3, 1, 48)[:, None]
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert torch.equal(q, _reference_rows(w, w.abs().amax(1)))
    assert torch.equal(q.abs().amax(1), torch.full((48,), QMAX, dtype=torch.int8))
    assert bool(((dequantize_rows(q, scale) - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())


def test_quantize_weight_clip_saturates_beyond_the_clipped_range():
    w = torch.randn(16, 64, generator=_gen(2))
    clip = torch.linspace(0.5, 1.0, 16)
    q, scale = quantize_weight(w, clip)
    assert torch.allclose(scale, w.abs().amax(1) * clip / QMAX)
    beyond = w.abs() > (w.abs().amax(1) * clip)[:, None]
    assert bool((q[beyond].abs() == QMAX).all()) and bool(beyond[:8].any())
    with pytest.raises(ValueError, match="clip"):
        quantize_weight(w, torch.zeros(16))


def test_quantize_tokens_per_token_dynamic_and_zero_rows():
    x = torch.randn(33, 72, generator=_gen(3)) * torch.logspace(-2, 2, 33)[:, None]
    x[5] = 0
    q, scale = quantize_tokens(x)
    assert torch.equal(q, _reference_rows(x, x.abs().amax(1)))
    assert scale[5] == 1 and not q[5].any()
    assert bool(((dequantize_rows(q, scale) - x).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())
    assert int(q.min()) >= -QMAX


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 256, 768), (2, 1, 21), (17, 64, 40), (64, 37, 3), (300, 512, 96)])
def test_int8_matmul_paths_equal_exact_int64(m, k, n):
    a, b = _int8((m, k), 10 + m), _int8((n, k), 20 + n)  # full range, -128 included
    exact = _exact(a, b)
    assert torch.equal(int8_matmul_fallback(a, b), exact)
    assert torch.equal(int8_matmul(a, b), exact) and int8_matmul(a, b).dtype == torch.int32
    if int_mm_applies(a, b):
        assert torch.equal(int8_matmul_int_mm(a, b), exact)


def test_int8_matmul_layouts_the_cpu_int_mm_misreads():
    # torch._int_mm on CPU misreads a [1, K] row whose strides are (1, 1) and a K == 1 weight view.
    row = _int8((24, 1), 30).t()  # [1, 24], strides (1, 1)
    w = _int8((16, 24), 31)
    assert row.stride() == (1, 1)
    assert torch.equal(int8_matmul(row, w), _exact(row, w))
    column_major, sliced = _int8((24, 40), 32).t(), _int8((8, 48), 33)[:, ::2]  # [40, 24], [8, 24]
    assert torch.equal(int8_matmul(column_major, sliced), _exact(column_major, sliced))
    k1a, k1b = _int8((9, 1), 34), _int8((5, 1), 35)
    assert not int_mm_applies(k1a, k1b) and torch.equal(int8_matmul(k1a, k1b), _exact(k1a, k1b))


def test_int8_matmul_rejects_bad_operands():
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        int8_matmul(_int8((2, 4), 1), _int8((3, 5), 2))
    with pytest.raises(ValueError, match="overflow"):
        int8_matmul(torch.zeros(1, MAX_K + 1, dtype=torch.int8), torch.zeros(1, MAX_K + 1, dtype=torch.int8))


def test_w8a8_linear_equals_simulated_quantization_and_is_close_to_float():
    x, w = torch.randn(4, 9, 128, generator=_gen(4)), torch.randn(96, 128, generator=_gen(5)) * 0.02
    smooth = torch.rand(128, generator=_gen(6)) + 0.5
    w_int8, w_scale = quantize_weight(w * smooth)
    got = w8a8_linear(x, w_int8, w_scale, smooth)
    x_int8, x_scale = quantize_tokens(x.reshape(-1, 128) / smooth)
    simulated = dequantize_rows(x_int8, x_scale).double() @ dequantize_rows(w_int8, w_scale).double().t()
    assert got.shape == (4, 9, 96) and got.dtype == torch.float32
    assert torch.allclose(got.reshape(-1, 96).double(), simulated, rtol=1e-5, atol=1e-7)
    assert _rel(got, F.linear(x, w)) < 0.02


def test_int8_linear_forward_paths_agree_and_track_float():
    w, x = torch.randn(80, 64, generator=_gen(7)) * 0.02, torch.randn(2, 5, 64, generator=_gen(8))
    layer = Int8Linear.from_float(w, smooth=torch.rand(64, generator=_gen(9)) + 0.5)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    y = layer(x)
    assert torch.equal(y, w8a8_linear(x, layer.weight, layer.weight_scale, layer.smooth_scale))
    assert torch.equal(y.reshape(-1, 80), layer.matmul_quantized(*layer.quantize_input(x)))
    assert torch.equal(layer(x[0, :1]), y[0, :1])  # a single decode token takes the same path
    assert _rel(y, F.linear(x, w)) < 0.02
    assert torch.equal(Int8Linear.from_float(w).smooth_scale, torch.ones(64))


def test_smoothing_factors_formula_and_equivalence():
    x = torch.randn(256, 32, generator=_gen(10)) * torch.logspace(-1, 1, 32)
    w1, w2 = torch.randn(16, 32, generator=_gen(11)), torch.randn(24, 32, generator=_gen(12))
    x_amax = x.abs().amax(0)
    x_amax[3] = 0
    s = smoothing_factors(x_amax, [w1, w2], alpha=0.7)
    w_amax = torch.maximum(w1.abs().amax(0), w2.abs().amax(0))
    expected = x_amax.pow(0.7) / w_amax.pow(0.3)
    expected[3] = 1
    assert torch.allclose(s, expected, rtol=1e-5)
    assert torch.allclose((x / s) @ (w1 * s).t(), x @ w1.t(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(x_amax, [w1], alpha=1.5)


def test_clip_search_never_worse_on_calibration_and_blocks_share_a_ratio():
    # One large weight per row on an input channel that carries little signal: worth clipping.
    cols = torch.randint(0, 64, (32,), generator=_gen(15))
    x = torch.randn(256, 64, generator=_gen(13))
    x[:, cols] *= 0.05
    w = torch.randn(32, 64, generator=_gen(14)) * 0.02
    w[torch.arange(32), cols] *= 20
    errors = clip_errors(x, w)  # [G, N]
    clip = search_clip(x, w)
    chosen = errors.gather(0, torch.tensor([CLIP_GRID.index(round(float(c), 2)) for c in clip])[None])[0]
    assert bool((chosen <= errors[0]).all()) and bool((clip < 1).any())
    blocked = search_clip(x, w, block_size=8)
    assert all(len(set(blocked[i:i + 8].tolist())) == 1 for i in range(0, 32, 8))


def _outlier_activations(m: int, k: int, channels: torch.Tensor, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=_gen(seed))
    x[:, channels] *= 50
    return x


def test_smoothing_and_clipping_cut_outlier_error_at_least_2x():
    """docs/int8.md, outlier experiment: x50 outliers on 4 of 256 input channels."""
    k, n = 256, 512
    w = torch.randn(n, k, generator=_gen(16)) * 0.02
    channels = torch.randperm(k, generator=_gen(17))[:4]
    calib, test = _outlier_activations(512, k, channels, 18), _outlier_activations(512, k, channels, 19)
    ref = test @ w.t()
    plain = _rel(Int8Linear.from_float(w)(test), ref)
    s = smoothing_factors(calib.abs().amax(0), [w], alpha=0.5)
    clip = search_clip(calib / s, w * s)
    smoothed = _rel(Int8Linear.from_float(w, s, clip)(test), ref)
    print(f"outlier experiment: plain {plain:.4f}, smoothed + clipped {smoothed:.4f}, {plain / smoothed:.1f}x")
    assert plain / smoothed >= 2
