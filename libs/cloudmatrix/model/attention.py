"""Multi-head Latent Attention (MLA), DeepSeek-V3 flavour, over a latent KV cache.

Shape legend: B = batch, S = new tokens, T = cached + new tokens, H = heads, C = kv_lora_rank,
N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim, D = hidden size.

What is cached per token is the compressed latent (C values, after kv_a_layernorm) plus the shared
rope key (R values, after RoPE): the 512 + 64 values per token per layer of the paper. Two ways to
attend over it:
- expanded: kv_b_proj turns every cached latent into per-head keys and values (prefill);
- absorbed: W_UK is folded into the query and W_UV applied after attention, so attention runs
  over the latent itself as one shared KV head of dim C + R (decode: no per-step expansion).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn

from cloudmatrix.kernels.attention import attention
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.layers import RMSNorm, RotaryEmbedding


class KVView(Protocol):
    """Where a step's KV goes and comes from. Tokens may arrive packed ([1, total] for a ragged
    batch); ``unpack`` / ``pack`` move per-token tensors between that layout and [B, S, ...]."""

    def update(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor):
        """Store the new tokens' latent; return (latent [B, T, C], k_rope [B, T, R], mask [B, S, T])."""

    def unpack(self, t: torch.Tensor) -> torch.Tensor: ...

    def pack(self, t: torch.Tensor) -> torch.Tensor: ...


DECODE_QUERIES = 2  # a decode step's queries per sequence: its last token and the MTP draft


@dataclasses.dataclass
class AttentionOptions:
    """How MLA runs: the attention core (fp32 or an fp16 flash mode) and when to absorb."""

    core: str = "fp32"
    absorb: str = "decode"  # "never", "decode" (decode steps: one token, or one and its MTP draft) or "always"

    def __post_init__(self) -> None:
        if self.absorb not in ("never", "decode", "always"):
            raise ValueError(f"absorb must be 'never', 'decode' or 'always', got {self.absorb!r}")

    def absorbed(self, new_tokens: int) -> bool:
        return self.absorb == "always" or (self.absorb == "decode" and new_tokens <= DECODE_QUERIES)


@dataclasses.dataclass
class LatentKVCache:
    """Dense per-layer latent KV of equal-length sequences: latent [B, T, C], k_rope [B, T, R]."""

    latent: list[torch.Tensor | None]
    k_rope: list[torch.Tensor | None]

    @classmethod
    def empty(cls, num_layers: int) -> "LatentKVCache":
        return cls([None] * num_layers, [None] * num_layers)

    def update(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor):
        if self.latent[layer] is not None:
            latent = torch.cat([self.latent[layer], latent], dim=1)
            k_rope = torch.cat([self.k_rope[layer], k_rope], dim=1)
        self.latent[layer], self.k_rope[layer] = latent, k_rope
        key_pos = torch.arange(latent.shape[1])
        return latent, k_rope, key_pos[None, None, :] <= positions[:, :, None]

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        return t  # already [B, S, ...]

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        return t


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, options: AttentionOptions) -> None:
        super().__init__()
        self.cfg, self.options = cfg, options
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

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK [H, N, C], W_UV [H, V, C]."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(cfg.num_attention_heads, -1, cfg.kv_lora_rank)
        return w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

    def attend_expanded(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Per-head keys/values from the latent; returns [B, S, H, V]."""
        cfg = self.cfg
        kv = self.kv_b_proj(latent).view(*latent.shape[:2], cfg.num_attention_heads, -1)  # [B, T, H, N+V]
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(*k_nope.shape[:3], -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, cfg.softmax_scale,
                        self.options.core)  # [B, H, S, V]
        return out.transpose(1, 2)

    def attend_absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Attention over the latent as one shared KV head of dim C + R; returns [B, S, H, V]."""
        w_uk, w_uv = self._w_uk_uv()
        q_latent = torch.einsum("bshn,hnc->bhsc", q_nope, w_uk)  # [B, H, S, C]
        q = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1)  # [B, H, S, C+R]
        k = torch.cat([latent, k_rope], dim=-1)[:, None]  # [B, 1, T, C+R]
        out_latent = attention(q, k, latent[:, None], mask, self.cfg.softmax_scale, self.options.core)  # [B, H, S, C]
        return torch.einsum("bhsc,hvc->bshv", out_latent, w_uv)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: KVView, layer: int) -> torch.Tensor:
        # x: [B, S, D], positions: [B, S] -> [B, S, D]
        q_nope, q_rope = self.project_q(x, positions)
        latent, k_rope, mask = kv.update(layer, *self.project_latent(x, positions), positions)
        q_nope, q_rope = kv.unpack(q_nope), kv.unpack(q_rope)  # [B, S, H, *]
        attend = self.attend_absorbed if self.options.absorbed(q_nope.shape[1]) else self.attend_expanded
        out = kv.pack(attend(q_nope, q_rope, latent, k_rope, mask))  # x's layout, [..., H, V]
        return self.o_proj(out.reshape(*x.shape[:2], -1))
