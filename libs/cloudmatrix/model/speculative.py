"""Verifying the MTP module's draft: the paper's one speculative token per decode step.

The draft d for position t+1 is the MTP module's greedy guess (a point proposal, q = one-hot at d,
as vLLM treats drafts without probabilities). The main model's logits at the last accepted token
(predicting t+1) and at the draft (predicting t+2) decide:

- greedy: d is accepted when it is the argmax at t+1; then the argmax at t+2 follows it.
- sampling: with p the request's filtered target distribution at t+1, d is accepted with
  probability min(1, p(d) / q(d)) = p(d); else the token is drawn from the normalised
  max(0, p - q), which is p without d. So P(token = x) = p(x) for every x: the output
  distribution is exactly the target model's. Both draws use the request's random stream of
  position t+1 (``SamplingParams.generator``), the token after an accepted draft that of t+2:
  a seeded request samples the same tokens whichever die or step runs it.

Shape legend: V = vocab size.
"""
from __future__ import annotations

import torch

from cloudmatrix.model.sampling import filter_logits, sample_token
from cloudmatrix.sampling_params import SamplingParams

__all__ = ["verify_draft"]


def verify_draft(logits: torch.Tensor, draft: int, params: SamplingParams, position: int) -> list[int]:
    """logits: [2, V] at the last accepted token (predicting ``position``) and at the draft ->
    the accepted tokens: [d, the token after it] or [the token that replaces d]."""
    if params.greedy:
        first = int(logits[0].argmax())
        return [draft, int(logits[1].argmax())] if first == draft else [first]
    generator = params.generator(position)
    probs = filter_logits(logits[0].float(), params).softmax(-1)  # [V]
    if float(torch.rand((), generator=generator)) < float(probs[draft]):
        return [draft, sample_token(logits[1], params, params.generator(position + 1))]
    residual = probs.clone()
    residual[draft] = 0.0  # max(0, p - q) with q one-hot at the draft
    if not float(residual.sum()) > 0:  # p(d) rounded below 1 with nothing else left: d it is
        return [draft, sample_token(logits[1], params, params.generator(position + 1))]
    return [int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
