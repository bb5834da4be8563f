"""One request as an instance's scheduler sees it: its tokens, how many of them have KV on its
die, its blocks, its state, and the queue its outputs go to.

The scheduler is the only writer of a request's state; the service core that submitted it only
reads its outbox (``StepEvent`` items, or the exception that ended it).
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import time

import torch

from cloudmatrix.errors import FieldError
from cloudmatrix.sampling_params import FinishReason, SamplingParams, StopRule


class RequestState(enum.Enum):
    WAITING = "waiting"        # queued, no blocks (new, or preempted: its KV was dropped)
    RUNNING = "running"        # holds blocks on its die and steps
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """What one step gave a request: its sampled token (None for a chunk that only wrote KV), the
    finish reason when it ended, seconds it waited for the step, and the step's measured and
    modeled seconds. ``kv`` carries the exported blocks of a finished request that asked for them."""

    token_id: int | None
    finish_reason: FinishReason | None
    queued_s: float
    step_measured_s: float
    step_modeled_s: float
    kv: list[torch.Tensor] | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """``token_ids`` are every token known so far; the first ``prefix_tokens`` of them arrive with
    their KV (``prefix_kv``: [layers, n, C+R] per block, all full but maybe the last), written to
    the die on admission. The rest are computed in chunks of at most ``chunk_tokens``; the step
    that reaches the last known token samples the next one. ``export_from_block``: on finishing,
    the KV of the blocks from there on is read back and handed out in the final event."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    stop: StopRule
    prefix_kv: list[torch.Tensor] = dataclasses.field(default_factory=list)
    chunk_tokens: int = 2**31
    export_from_block: int | None = None
    # Scheduler-owned from here on.
    state: RequestState = RequestState.WAITING
    die: int | None = None
    blocks: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    new_tokens: int = 0
    preemptions: int = 0
    waiting_since: float = dataclasses.field(default_factory=time.perf_counter)
    outbox: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    trace_context: object = None     # the submitter's OpenTelemetry context (engine.step spans join it)

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise FieldError("token_ids", "the request has no tokens")
        if self.prefix_tokens >= len(self.token_ids):
            raise FieldError("prefix_kv", f"{self.prefix_tokens} tokens of KV leave none of the "
                             f"{len(self.token_ids)} tokens to compute")

    @property
    def prefix_tokens(self) -> int:
        return sum(kv.shape[1] for kv in self.prefix_kv)

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def next_chunk(self, budget: int) -> list[int]:
        """The tokens this request would compute next, at most ``budget`` of them."""
        end = min(len(self.token_ids), self.num_computed + self.chunk_tokens, self.num_computed + budget)
        return self.token_ids[self.num_computed:end]
