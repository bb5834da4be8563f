"""Expert-parallel MoE as three pure steps around two all-to-all rounds.

dispatch: every (token, chosen expert) pair becomes a row sent to a die hosting that expert;
experts: a die runs its experts over the rows it received, grouped by expert, and scales each
output by the router weight; combine: outputs go back to the token's die and are summed.

Shape legend: T = tokens on this die, K = experts per token, n = rows in a batch, D = hidden size.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cloudmatrix.model.moe import Routing
from cloudmatrix.quant.primitives import quantize_tokens

DISPATCH_DTYPES = ("float32", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """Rows crossing the fabric: hidden [n, D] (int8 with scales [n], or float), token_index [n]
    (row in the owning die's batch), expert_ids [n], weights [n] (router gate weights)."""

    hidden: torch.Tensor
    token_index: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    scales: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def payload_bytes(self) -> int:
        tensors = [self.hidden, self.token_index, self.expert_ids, self.weights]
        tensors += [self.scales] if self.scales is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)


def encode_hidden(x: torch.Tensor, dtype: str, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [T, D] fp32 -> what dispatch sends: int8 + per-token scale (quantized once, here), or float."""
    if dtype == "int8":
        return quantize_tokens(x / smooth if smooth is not None else x)
    if dtype == "bfloat16":
        return x.to(torch.bfloat16), None
    if dtype == "float32":
        return x.float(), None
    raise ValueError(f"dispatch dtype {dtype!r} is not one of {', '.join(DISPATCH_DTYPES)}")


def build_dispatch(x: torch.Tensor, routing: Routing, destinations: torch.Tensor, num_dies: int,
                   dtype: str, smooth: torch.Tensor | None = None) -> dict[int, TokenRows]:
    """x: [T, D], destinations: [T, K] die ids -> rows per destination die (every die, maybe empty)."""
    hidden, scales = encode_hidden(x, dtype, smooth)
    token = torch.arange(x.shape[0])[:, None].expand_as(routing.expert_ids).reshape(-1)  # [T*K]
    dest, experts, weights = destinations.reshape(-1), routing.expert_ids.reshape(-1), routing.weights.reshape(-1)
    out = {}
    for die in range(num_dies):
        pick = (dest == die).nonzero().flatten()
        rows = token[pick]
        out[die] = TokenRows(hidden[rows], rows.to(torch.int32), experts[pick].to(torch.int32),
                             weights[pick].float(), None if scales is None else scales[rows])
    return out


def run_local_experts(received: dict[int, TokenRows], experts: nn.ModuleDict) -> dict[int, TokenRows]:
    """Run this die's experts over every row it received; returns the weighted outputs per source
    die (float32, rows in the order received). Rows are grouped by expert: one GEMM batch each."""
    sources = sorted(received)
    rows = [received[s] for s in sources]
    lengths = [len(r) for r in rows]
    expert_ids = torch.cat([r.expert_ids for r in rows]).long()
    out = torch.zeros(sum(lengths), _hidden_dim(rows), dtype=torch.float32)
    for expert in expert_ids.unique().tolist():
        if str(expert) not in experts:
            raise ValueError(f"received tokens for expert {expert}, which this die does not host")
        pick = (expert_ids == expert).nonzero().flatten()
        out[pick] = _apply_expert(experts[str(expert)], rows, pick)
    weights = torch.cat([r.weights for r in rows])
    out = out * weights[:, None]
    pieces = out.split(lengths)
    return {s: TokenRows(p, r.token_index, r.expert_ids, r.weights) for s, p, r in zip(sources, pieces, rows)}


def _hidden_dim(rows: list[TokenRows]) -> int:
    return rows[0].hidden.shape[1] if rows else 0


def _apply_expert(expert: nn.Module, rows: list[TokenRows], pick: torch.Tensor) -> torch.Tensor:
    hidden = torch.cat([r.hidden for r in rows])[pick]  # [n, D]
    if hidden.dtype != torch.int8:
        return expert(hidden.float())
    scales = torch.cat([r.scales for r in rows])[pick]
    return expert.forward_quantized(hidden, scales)


def combine_sum(returned: dict[int, TokenRows], num_tokens: int, hidden_dim: int) -> torch.Tensor:
    """Sum every returned weighted expert output into its token's row: [T, D] fp32."""
    out = torch.zeros(num_tokens, hidden_dim, dtype=torch.float32)
    for rows in returned.values():
        if len(rows):
            out.index_add_(0, rows.token_index.long(), rows.hidden.float())
    return out
