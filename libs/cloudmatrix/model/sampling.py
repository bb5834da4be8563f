"""Token sampling: greedy, temperature, top-k and top-p (nucleus), reproducible from a seed.

Shape legend: V = vocab size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import secrets

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 64

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, position: int) -> torch.Generator:
        """The generator for the token sampled at ``position``: a function of (seed, position) only,
        so a sequence samples the same tokens whichever process or die runs each step."""
        if self.seed is None:
            return torch.Generator().manual_seed(secrets.randbits(63))
        digest = hashlib.sha256(f"{self.seed}:{position}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


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
