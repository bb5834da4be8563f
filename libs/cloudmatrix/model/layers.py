"""Small building blocks of DeepSeek-V3: RMSNorm, rotary embedding, the SwiGLU MLP.

Shape legend: T = tokens, D = hidden size, I = intermediate size, R = rope dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D]; statistics in fp32 whatever the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and experts."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_quantized(self, x_int8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """Tokens already quantized for gate/up (W8A8 expert after an INT8 dispatch): [T, D] -> [T, D].

        gate_proj and up_proj must be Int8Linear sharing the smoothing vector the tokens used.
        """
        gate = self.gate_proj.matmul_quantized(x_int8, x_scale)
        return self.down_proj(F.silu(gate) * self.up_proj.matmul_quantized(x_int8, x_scale))


class RotaryEmbedding(nn.Module):
    """Plain RoPE over the decoupled rope part of q and k (qk_rope_head_dim).

    DeepSeek checkpoints lay the rotary dims out as interleaved pairs (x0, x1), (x2, x3), ...;
    with ``interleave`` we rotate those pairs and emit [evens', odds'] (the layout transformers
    uses), otherwise pairs are (x_i, x_{i+R/2}).
    """

    def __init__(self, dim: int, theta: float, interleave: bool) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = interleave

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, S, H, R] (H may be 1), positions: [B, S] -> [B, S, H, R]
        angles = positions.float()[..., None] * self.inv_freq  # [B, S, R/2]
        cos = angles.cos()[:, :, None, :].to(x.dtype)
        sin = angles.sin()[:, :, None, :].to(x.dtype)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
