"""INT8 W8A8 tensor primitives: per-channel weights, per-token activations, int8 GEMM.

Shape legend: M = tokens, K = input channels, N = output channels.

Both quantizers are symmetric with the range [-127, 127] (-128 is never produced), round half to
even, and map an all-zero row to scale 1. ``quantize_tokens`` is the single place where tokens are
quantized: the linear layers call it, and so does the early INT8 quantization before MoE dispatch.

``int8_matmul`` accumulates in int32. It runs ``torch._int_mm`` where that kernel is exact on this
CPU build (torch 2.13) and an exact float64 GEMM otherwise. What we measured about the CPU
``_int_mm`` (tests/test_quant.py covers these layouts):

* any M, K, N >= 1 are accepted (the CUDA limits M > 16, K and N multiples of 8 do not apply);
  both operands must be 2-D int8;
* a row vector whose strides are (1, 1) is misread, e.g. a [1, K] made by transposing a [K, 1]
  tensor, or the weight view b.t() when K == 1 (strides (1, 1)); the result is silently wrong.
  We therefore hand it ``a`` as a fresh row-major copy when its strides are not (K, 1), ``b.t()``
  of a row-major [N, K] weight, and take the fallback when K == 1;
* accumulation wraps around in int32: exact for K <= 131,071 (128 * 128 * K < 2^31) whatever
  the int8 values; larger K is rejected.
"""
from __future__ import annotations

import torch

QMAX = 127
# Largest K whose int32 sums of int8 products (|product| <= 128 * 128) cannot overflow.
MAX_K = (2**31 - 1) // (128 * 128)


def _symmetric_scale(amax: torch.Tensor) -> torch.Tensor:
    # amax: [R] -> scale [R] fp32, an all-zero row gets scale 1 (any scale quantizes zeros to 0)
    amax = amax.float()
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


def _quantize_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: [R, C], scale: [R] -> int8 [R, C]
    return (x.float() * scale.reciprocal()[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)


def quantize_weight(w: torch.Tensor, clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w [N, K] -> (w_int8 [N, K], scale [N] fp32).

    ``clip`` [N] in (0, 1] shrinks each channel's range to clip * max|w_n|; values beyond it saturate.
    """
    if w.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {list(w.shape)}")
    amax = w.detach().abs().amax(dim=1).float()  # [N]
    if clip is not None:
        if clip.shape != amax.shape or not bool(((clip > 0) & (clip <= 1)).all()):
            raise ValueError(f"clip must be [N={amax.numel()}] ratios in (0, 1]")
        amax = amax * clip.float()
    scale = _symmetric_scale(amax)
    return _quantize_rows(w.detach(), scale), scale


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic symmetric int8: x [M, K] float -> (x_int8 [M, K], scale [M] fp32)."""
    if x.dim() != 2:
        raise ValueError(f"tokens must be [M, K], got shape {list(x.shape)}")
    scale = _symmetric_scale(x.detach().abs().amax(dim=1))
    return _quantize_rows(x, scale), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [R, C] int8, scale [R] -> fp32 [R, C] (the value each int8 entry stands for)."""
    return q.float() * scale[:, None]


def _check_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int8_matmul needs int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_matmul needs a [M, K] and b [N, K], got {list(a.shape)} and {list(b.shape)}")
    if a.shape[1] > MAX_K:
        raise ValueError(f"K={a.shape[1]} exceeds {MAX_K}: int32 accumulation could overflow")


def int_mm_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``int8_matmul`` takes the ``torch._int_mm`` path for a [M, K] x b [N, K]."""
    return a.shape[1] >= 2 and a.numel() > 0 and b.numel() > 0


def _row_major(t: torch.Tensor) -> torch.Tensor:
    # A copy with strides exactly (C, 1) unless t has them already (.contiguous() keeps (1, 1) rows).
    if t.stride() == (t.shape[1], 1):
        return t
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def int8_matmul_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 x b [N, K] int8 -> int32 [M, N] via torch._int_mm (requires int_mm_applies)."""
    if not int_mm_applies(a, b):
        raise RuntimeError(f"_int_mm path called with a {list(a.shape)}, b {list(b.shape)}")
    return torch._int_mm(_row_major(a), _row_major(b).t())


def int8_matmul_fallback(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 x b [N, K] int8 -> int32 [M, N] by a float64 GEMM.

    Exact: every product is an integer of magnitude <= 2^14 and every partial sum stays far below
    2^53 for K <= MAX_K, so float64 represents all of them exactly whatever the summation order.
    """
    return (a.double() @ b.double().t()).to(torch.int32)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 x b [N, K] int8 -> int32 [M, N] = sum_k a[m, k] * b[n, k], exact."""
    _check_operands(a, b)
    if int_mm_applies(a, b):
        return int8_matmul_int_mm(a, b)
    return int8_matmul_fallback(a, b)


def w8a8_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                smooth: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float -> fp32 [..., N]: (x / smooth) quantized per token, int8 GEMM, dequantized.

    ``w_int8`` [N, K] / ``w_scale`` [N] come from ``quantize_weight`` of the weight already multiplied
    by ``smooth`` [K] (so that (x / s) @ (W * s)^T == x @ W^T before rounding).
    """
    flat = x.reshape(-1, x.shape[-1]).float()  # [M, K]
    if smooth is not None:
        flat = flat / smooth
    y = w8a8_matmul(*quantize_tokens(flat), w_int8, w_scale)  # [M, N]
    return y.view(*x.shape[:-1], w_int8.shape[0])


def w8a8_matmul(x_int8: torch.Tensor, x_scale: torch.Tensor, w_int8: torch.Tensor,
                w_scale: torch.Tensor) -> torch.Tensor:
    """Quantized tokens x_int8 [M, K], x_scale [M] times w_int8 [N, K], w_scale [N] -> fp32 [M, N]."""
    return int8_matmul(x_int8, w_int8).float().mul_(x_scale[:, None]).mul_(w_scale)
