"""The gateway's boundary dataclasses: what a request asks, what the core streams back, and what
the prefill / decode backends answer. Protos and JSON stay in the servicer and the HTTP layer."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens; ``max_tokens`` counts the first token (sampled by prefill)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()           # stop strings, matched on the detokenized text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"seed: must be in [0, 2^64), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """A completion request: ``prompt`` is text (the gateway tokenizes it, BOS first) or token ids."""

    request_id: str
    model: str
    prompt: str | list[int]
    sampling: Sampling = Sampling()


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A tokenized, validated request, ready to be admitted."""

    request_id: str
    model: str
    token_ids: list[int]
    sampling: Sampling


@dataclasses.dataclass(frozen=True)
class Delta:
    """New completion tokens and their text (text may lag the ids: incomplete UTF-8, stop prefixes)."""

    text: str
    token_ids: list[int]


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclasses.dataclass(frozen=True)
class Timing:
    """Phases queue, prefill, decode: measured wall seconds here and modeled CloudMatrix384
    seconds, kept apart. queue + prefill is the time to the first token."""

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
    """The last event of a generation: why it stopped ("stop" or "length"), usage, timing, and any
    text held back until the end."""

    reason: str
    usage: Usage
    timing: Timing
    text: str = ""


@dataclasses.dataclass(frozen=True)
class PrefillOutcome:
    first_token: int
    kv: Any                              # the KV handle, passed on to decode untouched
    cached_tokens: int
    measured: dict[str, float]           # the prefill instance's phases
    modeled: dict[str, float]
    modeled_s: float


@dataclasses.dataclass(frozen=True)
class DecodeStep:
    token_ids: list[int]
    finish_reason: str | None            # "stop", "length", "cancelled" or None
    modeled_s: float
