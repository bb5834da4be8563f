"""DeepSeek-V3 mixture of experts: sigmoid router with group-limited top-k, routed + shared experts.

Shape legend: T = tokens, D = hidden size, E = routed experts, K = experts per token,
G = expert groups.

The MoE is split into the three steps the serving system distributes: ``route`` (on the token's
die), expert computation grouped by expert (on the expert's die, after dispatch) and the weighted
sum (after combine).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.layers import MLP


@dataclasses.dataclass(frozen=True)
class Routing:
    """Top-k choice per token: expert ids [T, K] and combine weights [T, K] (scaled, fp32)."""

    expert_ids: torch.Tensor
    weights: torch.Tensor


class Router(nn.Module):
    """The ``gate``: sigmoid scores, score-correction bias for selection only, group-limited top-k."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        # x: [T, D] -> Routing with [T, K] tensors. The router always runs in fp32.
        cfg = self.cfg
        scores = torch.nn.functional.linear(x.float(), self.weight.float()).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias.float()
        choice = self._mask_to_top_groups(choice)
        expert_ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, K]
        weights = scores.gather(1, expert_ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(expert_ids, weights * cfg.routed_scaling_factor)

    def _mask_to_top_groups(self, choice: torch.Tensor) -> torch.Tensor:
        # choice: [T, E]; a group's score is the sum of its two best experts.
        cfg = self.cfg
        grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)  # [T, G, E/G]
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, G]
        top_groups = group_scores.topk(cfg.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)


def run_experts(x: torch.Tensor, routing: Routing, experts: nn.ModuleList) -> torch.Tensor:
    """Routed-expert output, tokens grouped by expert (one GEMM batch per expert).

    x: [T, D] -> [T, D] = sum_k weight[t, k] * expert_{id[t, k]}(x[t]). Tokens are gathered once in
    expert order and scattered back once, so autograd keeps one [T, D] buffer, not one per expert.
    """
    flat_ids = routing.expert_ids.reshape(-1)  # [T*K]
    order = flat_ids.argsort(stable=True)
    token_of = order // routing.expert_ids.shape[1]  # token index of each sorted slot
    counts = torch.bincount(flat_ids, minlength=len(experts)).tolist()
    grouped = x[token_of].split(counts)  # per expert: [n_e, D]
    ys = [experts[e](rows) for e, rows in enumerate(grouped) if rows.shape[0]]
    if not ys:
        return torch.zeros_like(x)
    y = torch.cat(ys)  # [T*K, D] in expert order
    w = routing.weights.reshape(-1)[order].to(y.dtype)[:, None]  # [T*K, 1]
    return torch.zeros_like(x).index_add_(0, token_of, y * w)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> [B, S, D]
        flat = x.reshape(-1, x.shape[-1])
        routed = run_experts(flat, self.gate(flat), self.experts)
        return (routed + self.shared_experts(flat)).view_as(x)
