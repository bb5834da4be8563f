"""Multi-head Latent Attention (MLA), DeepSeek-V3 flavour, over a dense latent KV cache.

Shape legend: B = batch, S = new tokens, T = cached + new tokens, H = heads, C = kv_lora_rank,
N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim, D = hidden size.

What is cached per token is the compressed latent (C values, after kv_a_layernorm) plus the shared
rope key (R values, after RoPE): the 512 + 64 values per token per layer of the paper.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.layers import RMSNorm, RotaryEmbedding

# A large finite negative for masked scores: a fully masked row never turns into NaN.
MASK_VALUE = -1e30


@dataclasses.dataclass
class LatentKVCache:
    """Per-layer latent KV of a batch of equal-length sequences: latent [B, T, C], k_rope [B, T, R]."""

    latent: list[torch.Tensor | None]
    k_rope: list[torch.Tensor | None]

    @classmethod
    def empty(cls, num_layers: int) -> "LatentKVCache":
        return cls([None] * num_layers, [None] * num_layers)

    def append(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent[layer] is not None:
            latent = torch.cat([self.latent[layer], latent], dim=1)
            k_rope = torch.cat([self.k_rope[layer], k_rope], dim=1)
        self.latent[layer], self.k_rope[layer] = latent, k_rope
        return latent, k_rope

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows listed in ``rows`` (finished sequences leave the batch)."""
        self.latent = [t if t is None else t[rows] for t in self.latent]
        self.k_rope = [t if t is None else t[rows] for t in self.k_rope]


def causal_mask(positions: torch.Tensor, total_len: int) -> torch.Tensor:
    """positions: [B, S] absolute positions of the new tokens -> bool [B, S, T], True = may attend."""
    key_pos = torch.arange(total_len, device=positions.device)
    return key_pos[None, None, :] <= positions[:, :, None]


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, qk = cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_interleave)

    def project_q(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, S, D] -> q_nope [B, S, H, N], q_rope [B, S, H, R] (rotated)
        cfg = self.cfg
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(*x.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        return q_nope, self.rotary(q_rope, positions)

    def project_latent(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, S, D] -> latent [B, S, C], k_rope [B, S, R] (rotated): what the KV cache stores
        kv = self.kv_a_proj_with_mqa(x)
        latent, k_rope = kv.split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        k_rope = self.rotary(k_rope[:, :, None, :], positions)[:, :, 0, :]
        return self.kv_a_layernorm(latent), k_rope

    def attend(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Attention over expanded keys/values: returns [B, S, H * V]."""
        cfg = self.cfg
        kv = self.kv_b_proj(latent).view(*latent.shape[:2], cfg.num_attention_heads, -1)  # [B, T, H, N+V]
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        scores = torch.einsum("bshn,bthn->bhst", q_nope, k_nope)
        scores = scores + torch.einsum("bshr,btr->bhst", q_rope, k_rope)  # [B, H, S, T]
        scores = (scores * cfg.softmax_scale).masked_fill(~mask[:, None], MASK_VALUE)
        probs = scores.float().softmax(dim=-1).to(v.dtype)
        out = torch.einsum("bhst,bthv->bshv", probs, v)  # [B, S, H, V]
        return out.reshape(*out.shape[:2], -1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LatentKVCache, layer: int) -> torch.Tensor:
        # x: [B, S, D], positions: [B, S] -> [B, S, D]
        q_nope, q_rope = self.project_q(x, positions)
        latent, k_rope = cache.append(layer, *self.project_latent(x, positions))
        mask = causal_mask(positions, latent.shape[1])
        return self.o_proj(self.attend(q_nope, q_rope, latent, k_rope, mask))
