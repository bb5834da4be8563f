"""The DeepSeek-V3 decoder stack. Module names mirror the Hugging Face checkpoint keys.

Shape legend: B = batch, S = new tokens, D = hidden size, V = vocab.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cloudmatrix.model.attention import (
    AttentionOptions,
    KVView,
    LatentKVCache,
    MLAttention,
)
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.layers import MLP, RMSNorm
from cloudmatrix.model.moe import MoE

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


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, options: AttentionOptions, moe: MoEFactory) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, options, moe) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3(nn.Module):
    """DeepSeek-V3 for causal LM: ``forward(token_ids, positions, kv) -> logits``.

    ``kv`` is a dense ``LatentKVCache`` (``new_cache()``) or a paged view of a die's KV pool;
    ``attention`` (shared by every layer, changeable at run time) picks the attention core.
    """

    def __init__(self, cfg: ModelConfig, attention: AttentionOptions | None = None,
                 moe: MoEFactory = lambda cfg, layer: MoE(cfg)) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = attention or AttentionOptions()
        self.model = Backbone(cfg, self.attention, moe)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self) -> LatentKVCache:
        return LatentKVCache.empty(self.cfg.num_hidden_layers)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVView) -> torch.Tensor:
        # token_ids, positions: [B, S] -> logits [B, S, V] (fp32)
        x = self.model.embed_tokens(token_ids)
        for layer in self.model.layers:
            x = layer(x, positions, kv)
        return self.lm_head(self.model.norm(x)).float()
