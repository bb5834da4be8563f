"""One DeepSeek-V3 decoder layer: MLA then a dense MLP or an MoE, each behind an RMSNorm.

Shape legend: B = batch, S = new tokens, D = hidden size.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cloudmatrix.model.attention import AttentionOptions, KVView, MLAttention
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.layers import MLP, RMSNorm

# Builds the MoE block of a layer: (config, layer index) -> module. The default is the in-process
# MoE with every expert; a die of an expert-parallel instance plugs in its own.
MoEFactory = Callable[[ModelConfig, int], nn.Module]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, options: AttentionOptions, moe: MoEFactory) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, options)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = moe(cfg, layer) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: KVView) -> torch.Tensor:
        # x: [B, S, D] -> [B, S, D]
        x = x + self.self_attn(self.input_layernorm(x), positions, kv, self.layer)
        return x + self.mlp(self.post_attention_layernorm(x))
