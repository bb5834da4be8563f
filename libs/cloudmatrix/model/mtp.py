"""DeepSeek-V3's multi-token prediction (MTP) module of depth 1.

Shape legend: B = batch, S = positions, D = hidden size.

At position i the module reads the main model's final hidden state h_i (after the final RMSNorm,
what the output head sees) and the embedding of the next token t_{i+1}, and predicts t_{i+2}:

    x = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])   then one transformer block (MLA + MoE)
    logits = lm_head(shared_head.norm(block(x)))    embedding and head shared with the model

Its attention runs at position i (that of h_i, so its KV entry i sits where the main model's
does) over its own latent KV (layer index ``num_hidden_layers``): entry j holds (h_j, t_{j+1}), so
entry i may only see entries j <= i, never t_{i+2}. In a checkpoint its weights sit under ``model.layers.{num_hidden_layers}.``
with DeepSeek's names; the shared embedding and head are written there too, as DeepSeek does.
"""
from __future__ import annotations

import torch
from torch import nn

from cloudmatrix.model.attention import AttentionOptions, KVView
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.layers import RMSNorm
from cloudmatrix.model.transformer_layer import DecoderLayer, MoEFactory


class SharedHead(nn.Module):
    """The MTP module's own final norm; the head itself is the model's ``lm_head``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """A decoder block with the MTP input projection in front and its own norm behind."""

    def __init__(self, cfg: ModelConfig, options: AttentionOptions, moe: MoEFactory) -> None:
        super().__init__(cfg, cfg.num_hidden_layers, options, moe)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, positions: torch.Tensor,
                kv: KVView) -> torch.Tensor:
        # hidden, next_embeds: [B, S, D]; positions: [B, S] of the hidden states -> [B, S, D] (normed)
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        return self.shared_head.norm(super().forward(x, positions, kv))
