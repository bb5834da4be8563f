"""Token sampling: greedy, temperature, top-k and top-p (nucleus), reproducible from a seed
(the parameters: cloudmatrix/sampling_params.py).

Shape legend: V = vocab size, P = positions.
"""
from __future__ import annotations

import torch

from cloudmatrix.sampling_params import SamplingParams, TokenLogprobs

__all__ = ["filter_logits", "sample_token", "token_logprobs"]


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [V] fp32 -> temperature-scaled logits with filtered-out entries at -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [V] -> one token id."""
    if params.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits.float(), params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprobs]:
    """logits: [P, V] predicting ``targets`` (P ids) -> their log-probabilities, each with the
    ``top`` most likely alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [P, V]
    chosen = logp.gather(1, torch.tensor(targets, dtype=torch.long)[:, None])[:, 0].tolist()  # [P]
    if top:
        values, ids = logp.topk(top, dim=-1)  # [P, top]
        alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [()] * len(targets)
    return [TokenLogprobs(t, c, a) for t, c, a in zip(targets, chosen, alternatives)]

