"""The training objective: next-token loss, the MTP loss on t_{i+2}, and the sequence-wise
balance loss, with the router loads the bias update needs.

Shape legend: B = batch, L = tokens fed per sequence, D = hidden, V = vocab, E = routed experts,
K = experts per token, M = MoE layers.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from cloudmatrix.model.moe import Router, Routing
from cloudmatrix.model.transformer import DeepseekV3


@dataclasses.dataclass
class Losses:
    """The step's losses (scalars with grad) and the expert load per MoE router [M, E]."""

    lm: torch.Tensor
    mtp: torch.Tensor | None
    balance: torch.Tensor
    expert_load: torch.Tensor

    def total(self, mtp_weight: float, balance_weight: float) -> torch.Tensor:
        loss = self.lm + balance_weight * self.balance
        return loss if self.mtp is None else loss + mtp_weight * self.mtp


class RouterTap:
    """Records what every router saw and chose during one forward (inputs [T, D], ids [T, K])."""

    def __init__(self, model: DeepseekV3) -> None:
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.seen: list[tuple[Router, torch.Tensor, Routing]] = []
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, router: Router, args: tuple, routing: Routing) -> None:
        self.seen.append((router, args[0], routing))

    def reset(self) -> None:
        self.seen.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def sequence_balance_loss(router: Router, x: torch.Tensor, expert_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss for one layer, averaged over sequences:
    sum_i f_i * P_i with f_i = E / (K * T) * |{t: i in topK(t)}| and P_i the mean normalised score.
    x: [B*T, D], expert_ids: [B*T, K]."""
    cfg = router.cfg
    scores = F.linear(x.float(), router.weight.float()).sigmoid()  # [B*T, E]
    probs = (scores / scores.sum(-1, keepdim=True)).view(batch, -1, cfg.n_routed_experts)  # [B, T, E]
    tokens = probs.shape[1]
    hits = F.one_hot(expert_ids, cfg.n_routed_experts).sum(1).view(batch, tokens, -1).float()  # [B, T, E]
    f = hits.sum(1) * cfg.n_routed_experts / (cfg.num_experts_per_tok * tokens)  # [B, E]
    return (f * probs.mean(1)).sum(-1).mean()


def compute_losses(model: DeepseekV3, tap: RouterTap, window: torch.Tensor) -> Losses:
    """window [B, L + 1]: the model reads tokens 0..L-1 and predicts 1..L; its MTP module reads
    h_i and t_{i+1} for i in 0..L-2 and predicts t_{i+2}."""
    tap.reset()
    ids, length = window[:, :-1], window.shape[1] - 1
    positions = torch.arange(length).expand_as(ids)  # [B, L]
    kv = model.new_cache()
    hidden = model.hidden_states(ids, positions, kv)  # [B, L, D]
    lm = F.cross_entropy(model.lm_head(hidden).flatten(0, 1).float(), window[:, 1:].flatten())
    mtp = None
    if len(model.mtp):
        h_mtp = model.mtp_hidden(hidden[:, :-1], ids[:, 1:], positions[:, :-1], kv)  # [B, L-1, D]
        mtp = F.cross_entropy(model.lm_head(h_mtp).flatten(0, 1).float(), window[:, 2:].flatten())
    batch = window.shape[0]
    balance = torch.stack([sequence_balance_loss(r, x, routing.expert_ids, batch) for r, x, routing in tap.seen])
    load = torch.stack([torch.bincount(routing.expert_ids.flatten(), minlength=r.cfg.n_routed_experts)
                        for r, _, routing in tap.seen])
    return Losses(lm, mtp, balance.sum(), load)


@torch.no_grad()
def update_correction_bias(tap: RouterTap, load: torch.Tensor, speed: float) -> None:
    """Auxiliary-loss-free balancing: every router's e_score_correction_bias moves by ``speed``
    toward balance (down for an overloaded expert, up for an underloaded one). load: [M, E]."""
    for (router, _, _), counts in zip(tap.seen, load):
        counts = counts.float()
        router.e_score_correction_bias += speed * torch.sign(counts.mean() - counts)
