"""The MoE block of one die in an expert-parallel instance: route locally, dispatch tokens to the
dies hosting their experts, run the local experts, combine the outputs back.

Shape legend: B = batch, S = tokens per row, T = B*S tokens, D = hidden size.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.layers import MLP
from cloudmatrix.model.moe import Router
from cloudmatrix.moe.dispatch import (
    TokenRows,
    build_dispatch,
    combine_sum,
    run_local_experts,
)
from cloudmatrix.moe.placement import ExpertPlacement


class Exchange(Protocol):
    """One all-to-all round: send rows to every die (self included), receive rows from every die."""

    num_dies: int
    die_id: int

    def all_to_all(self, kind: str, layer: int, outgoing: dict[int, TokenRows]) -> dict[int, TokenRows]: ...


class ExpertParallelMoE(nn.Module):
    """Router and shared experts on every die; only this die's routed experts (``experts`` keyed by
    the global expert id, so checkpoint keys ``mlp.experts.<id>.*`` load unchanged)."""

    def __init__(self, cfg: ModelConfig, layer: int, placement: ExpertPlacement, exchange: Exchange,
                 dispatch_dtype: str) -> None:
        super().__init__()
        self.cfg, self.layer, self.placement, self.exchange = cfg, layer, placement, exchange
        self.dispatch_dtype = dispatch_dtype
        self.gate = Router(cfg)
        local = placement.experts_on(exchange.die_id, layer)
        self.experts = nn.ModuleDict({str(e): MLP(cfg.hidden_size, cfg.moe_intermediate_size) for e in local})
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.register_buffer("token_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)

    def _smoothing(self) -> torch.Tensor | None:
        """The layer's shared gate/up smoothing vector (INT8 dispatch quantizes x / smooth once)."""
        return getattr(self.shared_experts.gate_proj, "smooth_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> [B, S, D]
        flat = x.reshape(-1, x.shape[-1]).float()
        routing = self.gate(flat)
        destinations = self.placement.destinations(self.layer, routing.expert_ids)
        outgoing = build_dispatch(flat, routing, destinations, self.exchange.num_dies, self.dispatch_dtype,
                                  self._smoothing())
        received = self.exchange.all_to_all("dispatch", self.layer, outgoing)
        for rows in received.values():
            self.token_counts += torch.bincount(rows.expert_ids.long(), minlength=self.cfg.n_routed_experts)
        returned = self.exchange.all_to_all("combine", self.layer, run_local_experts(received, self.experts))
        routed = combine_sum(returned, flat.shape[0], flat.shape[1])
        return (routed + self.shared_experts(flat)).view_as(x)
