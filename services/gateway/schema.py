"""The gateway's boundary dataclasses: what a request asks, what the core streams back, and what
the prefill / decode backends answer. Protos and JSON stay in the servicer and the HTTP layer."""
from __future__ import annotations

import dataclasses
from typing import Any

from cloudmatrix.clients.types import DecodeStep
from cloudmatrix.sampling_params import FinishReason, SamplingParams, TokenLogprobs

__all__ = ["DecodeStep", "Delta", "Finish", "GenerateRequest", "PrefillOutcome", "Prepared", "SamplingParams",
           "Timing", "Usage"]


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """A completion request: ``prompt`` is text (the gateway tokenizes it, BOS first) or token ids."""

    request_id: str
    model: str
    prompt: str | list[int]
    sampling: SamplingParams = SamplingParams()
    prompt_only: bool = False       # max_tokens 0 with echo: the prompt's log-probabilities, no completion


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A tokenized, validated request, ready to be admitted."""

    request_id: str
    model: str
    token_ids: list[int]
    sampling: SamplingParams
    prompt_only: bool = False       # max_tokens 0 with echo: the prompt's log-probabilities, no completion


@dataclasses.dataclass(frozen=True)
class Delta:
    """New completion tokens and their text (text may lag the ids: incomplete UTF-8, stop prefixes),
    with their log-probabilities when the request asked for them (one per token). The first Delta
    also carries the prompt's (of its tokens after the first), when asked for."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclasses.dataclass(frozen=True)
class Timing:
    """Phases queue, prefill, decode: measured wall seconds here and modeled CloudMatrix384
    seconds, kept apart. queue + cache_load + prefill is the time to the first token (cache_load,
    the cached prefix's pool transfer, is modeled only)."""

    measured: dict[str, float]
    modeled: dict[str, float]

    @property
    def measured_s(self) -> float:
        return sum(self.measured.values())

    @property
    def modeled_s(self) -> float:
        return sum(self.modeled.values())


@dataclasses.dataclass(frozen=True)
class Finish:
    """The last event of a generation: why it stopped (STOP or LENGTH), usage, timing, and any
    text held back until the end."""

    reason: FinishReason
    usage: Usage
    timing: Timing
    text: str = ""


@dataclasses.dataclass(frozen=True)
class PrefillOutcome:
    first_token: int
    kv: Any                              # the KV handle, passed on to decode untouched (None: the first
                                         # token arrived ahead of the prompt's KV in the pool)
    cached_tokens: int
    measured: dict[str, float]           # the prefill instance's phases
    modeled: dict[str, float]
    modeled_s: float
    logprobs: TokenLogprobs | None = None                 # of first_token, when asked for
    prompt_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
