"""Modeled CloudMatrix384 seconds of one die's Forward, phase by phase, from the cost model.

The model prices what this die did: its own tokens' attention, projections and lm head (a fed
draft is a token like the others: a verifying step is a decode step of two queries per sequence);
the MTP module's positions (its input projection, attention and shared expert, and the head for
each new draft); the tokens its experts computed, the MTP layer's included (counted during the
step); and the bytes it sent and received in each dispatch / combine round.
"""
from __future__ import annotations

import dataclasses

from cloudmatrix.costmodel import ub
from cloudmatrix.costmodel.ops import expert_mlp_phase, gemm_s, mla_attention_for
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.precision import parse_precision


def _projections_s(cfg: ModelConfig, tokens: int, dtype: str) -> float:
    """q_a, q_b, kv_a, o_proj (kv_b is float: absorbed into q / applied after attention)."""
    h = cfg.num_attention_heads
    q = (gemm_s(tokens, cfg.hidden_size, cfg.q_lora_rank, dtype=dtype)
         + gemm_s(tokens, cfg.q_lora_rank, h * cfg.qk_head_dim, dtype=dtype)) if cfg.q_lora_rank \
        else gemm_s(tokens, cfg.hidden_size, h * cfg.qk_head_dim, dtype=dtype)
    kv = gemm_s(tokens, cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=dtype)
    return q + kv + gemm_s(tokens, h * cfg.v_head_dim, cfg.hidden_size, dtype=dtype)


def _round_s(traffic, kind: str, num_dies: int, me: int) -> float:
    total = 0.0
    for r in (t for t in traffic if t.kind == kind):
        # This die's view of the round: its own sends and receives (the busiest-die bound).
        matrix = [[0] * num_dies for _ in range(num_dies)]
        for dst, nbytes in r.sent.items():
            matrix[me][dst] = nbytes
        for src, nbytes in r.received.items():
            matrix[src][me] = nbytes
        total += ub.round_s(matrix, kind)
    return total


def _layer_s(cfg: ModelConfig, q_lens: list[int], kv_lens: list[int], dtype: str) -> tuple[float, float]:
    """(attention, shared expert) seconds of one MoE layer over sequences of q_lens new tokens.
    Decode-shaped steps (every sequence one token, or one and its draft) use the absorbed MLA."""
    tokens = sum(q_lens)
    attention = _projections_s(cfg, tokens, dtype) + mla_attention_for(cfg, q_lens, kv_lens,
                                                                        absorbed=max(q_lens) <= 2)
    shared_cfg = dataclasses.replace(cfg, moe_intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts)
    return attention, expert_mlp_phase(shared_cfg, [tokens], dtype).total_s


def _mtp_s(cfg: ModelConfig, seqs, mtp_positions: list[int], dtype: str) -> float:
    """The MTP module: eh_proj, its attention and shared expert over its positions, the head
    for each sequence's new draft (its routed experts and rounds are priced with the others)."""
    live = [(s, n) for s, n in zip(seqs, mtp_positions) if n]
    if not live:
        return 0.0
    tokens = sum(n for _, n in live)
    attention, shared = _layer_s(cfg, [n for _, n in live], [s.start + n for s, n in live], dtype)
    return (gemm_s(tokens, 2 * cfg.hidden_size, cfg.hidden_size, dtype=dtype) + attention + shared
            + gemm_s(len(live), cfg.hidden_size, cfg.vocab_size, dtype="bf16"))


def forward_modeled_s(model, precision_name: str, seqs, exchange, expert_tokens: dict[int, list[int]],
                      mtp_positions: list[int] | None = None) -> dict[str, float]:
    """Phases: attention (projections + MLA core), dense_mlp, experts, shared_expert, dispatch,
    combine, lm_head, mtp (with ``mtp_positions``, each sequence's MTP positions) and total.
    ``expert_tokens[layer]`` = tokens per local expert this step."""
    cfg = model.cfg
    dtype = "int8" if parse_precision(precision_name).int8_weights else "bf16"
    fed = [len(s.token_ids) + (s.draft is not None) for s in seqs]
    tokens = sum(fed)
    phases = {"attention": 0.0, "dense_mlp": 0.0, "experts": 0.0, "shared_expert": 0.0}
    if seqs:
        attention, shared = _layer_s(cfg, fed, [s.start + n for s, n in zip(seqs, fed)], dtype)
        phases["attention"] = attention * cfg.num_hidden_layers
        dense = cfg.first_k_dense_replace
        phases["dense_mlp"] = dense * (gemm_s(tokens, cfg.hidden_size, 2 * cfg.intermediate_size, dtype=dtype)
                                       + gemm_s(tokens, cfg.intermediate_size, cfg.hidden_size, dtype=dtype))
        phases["shared_expert"] = (cfg.num_hidden_layers - dense) * shared
        phases["lm_head"] = gemm_s(sum(1 + (s.draft is not None) for s in seqs), cfg.hidden_size, cfg.vocab_size,
                                   dtype="bf16")
        if mtp_positions is not None:
            phases["mtp"] = _mtp_s(cfg, seqs, mtp_positions, dtype)
    phases["experts"] = sum(expert_mlp_phase(cfg, counts, dtype).total_s for counts in expert_tokens.values())
    phases["dispatch"] = _round_s(exchange.traffic, "dispatch", exchange.num_dies, exchange.die_id)
    phases["combine"] = _round_s(exchange.traffic, "combine", exchange.num_dies, exchange.die_id)
    phases["total"] = sum(phases.values())
    return phases
