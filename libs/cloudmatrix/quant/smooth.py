"""Outlier suppression (SmoothQuant-style smoothing) and block-level clipping search.

Shape legend: M = calibration tokens, K = input channels, N = output channels, G = clip grid size.

Smoothing is the paper's "structural transformation": x @ W^T == (x / s) @ (W * s)^T, with
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) moving the difficulty of outlier input channels from
the per-token activation quantizer into the per-channel weight quantizer. Clipping then picks, per
block of output channels, the fraction of max|w| that the int8 range covers, from a grid, by the
W8A8 output error on calibration tokens.
"""
from __future__ import annotations

import torch

from cloudmatrix.quant.primitives import quantize_tokens, quantize_weight, w8a8_matmul

DEFAULT_ALPHA = 0.5
# Clip ratios tried, 1.0 (no clipping) first: ties keep the larger ratio.
CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5


def smoothing_factors(x_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """s [K] for linears that read the same input: x_amax [K] = max|X_j| over calibration tokens,
    weights = their [N_i, K] float weights (max|W_j| is taken over all of them).

    A channel that never fired or has an all-zero weight column keeps s_j = 1.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    w_amax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)  # [K]
    x_amax = x_amax.float()
    live = (x_amax > 0) & (w_amax > 0)
    s = x_amax.clamp_min(1e-12).pow(alpha) / w_amax.clamp_min(1e-12).pow(1 - alpha)
    return torch.where(live, s, torch.ones_like(s))


def clip_errors(x: torch.Tensor, w: torch.Tensor, grid: tuple[float, ...] = CLIP_GRID) -> torch.Tensor:
    """Squared W8A8 output error per (clip ratio, output channel): x [M, K], w [N, K] -> [G, N].

    x and w are the smoothed activations and weight; the reference is the float product x @ w^T.
    """
    x = x.float()
    reference = x @ w.float().t()  # [M, N]
    x_int8, x_scale = quantize_tokens(x)
    errors = []
    for ratio in grid:
        w_int8, w_scale = quantize_weight(w, torch.full((w.shape[0],), ratio))
        y = w8a8_matmul(x_int8, x_scale, w_int8, w_scale)  # [M, N]
        errors.append((y - reference).pow(2).sum(dim=0))
    return torch.stack(errors)


def search_clip(x: torch.Tensor, w: torch.Tensor, block_size: int = 1,
                grid: tuple[float, ...] = CLIP_GRID) -> torch.Tensor:
    """Clip ratio [N] per output channel, one ratio per block of ``block_size`` consecutive channels,
    minimizing the summed squared W8A8 output error of the block on calibration tokens x [M, K]."""
    if block_size < 1:
        raise ValueError(f"clip block_size must be >= 1, got {block_size}")
    errors = clip_errors(x, w, grid)  # [G, N]
    block_of = torch.arange(w.shape[0]) // block_size  # [N]
    per_block = torch.zeros(len(grid), int(block_of[-1]) + 1, dtype=errors.dtype)
    per_block.index_add_(1, block_of, errors)  # [G, blocks]
    best = per_block.argmin(dim=0)  # first minimum: the largest ratio among ties
    return torch.tensor(grid, dtype=torch.float32)[best][block_of]
