"""The DeepSeek-V3 decoder stack. Module names mirror the Hugging Face checkpoint keys.

Shape legend: B = batch, S = new tokens, D = hidden size, V = vocab.
"""
from __future__ import annotations

import torch
from torch import nn

from cloudmatrix.model.attention import AttentionOptions, KVView, LatentKVCache
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.layers import RMSNorm
from cloudmatrix.model.moe import MoE
from cloudmatrix.model.mtp import MTPLayer
from cloudmatrix.model.transformer_layer import DecoderLayer, MoEFactory

__all__ = ["Backbone", "DecoderLayer", "DeepseekV3", "MoEFactory"]


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
    With ``mtp`` (and ``num_nextn_predict_layers: 1`` in the config) the model also holds its MTP
    module (``mtp[0]``), used by training and evaluation through ``hidden_states`` / ``mtp_hidden``.
    """

    def __init__(self, cfg: ModelConfig, attention: AttentionOptions | None = None,
                 moe: MoEFactory = lambda cfg, layer: MoE(cfg), mtp: bool = False) -> None:
        super().__init__()
        if mtp and not cfg.num_nextn_predict_layers:
            raise ValueError(f"{cfg.model_id} has num_nextn_predict_layers=0: it has no MTP module")
        self.cfg = cfg
        self.attention = attention or AttentionOptions()
        self.model = Backbone(cfg, self.attention, moe)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList([MTPLayer(cfg, self.attention, moe)] if mtp else [])

    def new_cache(self) -> LatentKVCache:
        return LatentKVCache.empty(self.cfg.num_hidden_layers + len(self.mtp))

    def hidden_states(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVView) -> torch.Tensor:
        """The final hidden states (after the final norm; differentiable): [B, S] -> [B, S, D]."""
        x = self.model.embed_tokens(token_ids)
        for layer in self.model.layers:
            x = layer(x, positions, kv)
        return self.model.norm(x)

    def mtp_hidden(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                   kv: KVView) -> torch.Tensor:
        """The MTP module at each position: hidden [B, S, D] (h_i), next_ids [B, S] (t_{i+1}),
        positions [B, S] (i, that of h_i) -> [B, S, D]; ``lm_head`` of it predicts t_{i+2}."""
        return self.mtp[0](hidden, self.model.embed_tokens(next_ids), positions, kv)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVView) -> torch.Tensor:
        # token_ids, positions: [B, S] -> logits [B, S, V] (fp32)
        return self.lm_head(self.hidden_states(token_ids, positions, kv)).float()
