"""The engine core's step contract, in plain dataclasses: what the scheduler plans for a step
(``StepPlan`` of ``ScheduledChunk``), what the dies give back (``StepOutput``), and the ``Driver``
protocol, the one place that turns a step into RPCs (driver.py; tests/fake_dies.py fakes it).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch

from cloudmatrix.instance.request import Request
from cloudmatrix.sampling_params import TokenLogprobs


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """One request's tokens in a step: positions [start, start + len(token_ids)). ``following``:
    the known token after the chunk (for prompt log-probabilities, and the MTP module). ``draft``:
    the MTP module's guess of the token after the chunk, fed at the next position and verified."""

    request: Request
    token_ids: list[int]
    start: int
    sample: bool                   # the chunk reaches the request's last token: sample the next
    following: int | None = None
    draft: int | None = None

    @property
    def slots(self) -> int:
        """KV positions the step writes: the tokens and the draft."""
        return len(self.token_ids) + (self.draft is not None)


@dataclasses.dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = dataclasses.field(default_factory=list)
    # (die, request id) of sequences whose blocks were freed since the last plan: the dies forget them
    released: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    # requests admitted to blocks whose prefix KV is to be fetched (Request.prefix) before they step
    fetches: list[Request] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.chunks


@dataclasses.dataclass(frozen=True)
class StepTiming:
    started: float
    measured_s: float
    modeled_s: float


@dataclasses.dataclass(frozen=True)
class SequenceOutput:
    """A sequence's result of one step: its sampled tokens (none for a chunk that only wrote KV;
    two when its draft was accepted), their log-probabilities (when asked for), the chunk's prompt
    log-probabilities (of the tokens after its first; when asked for) and the MTP module's draft
    of the next token."""

    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] = ()
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    draft: int | None = None


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """One microbatch's step: outputs by request id, the slowest die's modeled seconds, and the
    dies' measured seconds per phase (mean over the dies)."""

    outputs: dict[str, SequenceOutput]
    modeled_s: float = 0.0
    phases: dict[str, float] = dataclasses.field(default_factory=dict)


class Driver(Protocol):
    """The dies of one instance, as the step loop uses them."""

    dies: Sequence

    async def forward(self, chunks: list[ScheduledChunk], released: list[tuple[int, str]] = (),
                      microbatch: int = 0) -> StepOutput: ...

    async def write_blocks(self, writes: dict[int, list[tuple[int, torch.Tensor]]]) -> None: ...

    async def read_blocks(self, die: int, blocks: list[tuple[int, int]]) -> list[torch.Tensor]: ...

    async def probe(self, timeout_s: float) -> list: ...

