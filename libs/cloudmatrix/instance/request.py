"""One request as an instance's scheduler sees it: its tokens, how many of them have KV on its
die, its blocks and its state. The scheduler is its only writer; the service core that
submitted it reads its ``StepEvent`` items (or the exception that ended it) from the step loop.
"""
from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable

import torch

from cloudmatrix.errors import FieldError
from cloudmatrix.sampling_params import FinishReason, SamplingParams, StopRule, TokenLogprobs


class RequestState(enum.Enum):
    WAITING = "waiting"        # queued, no blocks (new, or preempted: its KV was dropped)
    FETCHING = "fetching"      # holds blocks; its prefix KV is on its way from the pool
    RUNNING = "running"        # holds blocks on its die and steps
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """What one step gave a request: its new tokens (none for a chunk that only wrote KV; two
    when the step accepted the MTP draft), the finish reason when it ended, seconds it waited for
    the step, and the step's measured and modeled seconds. ``kv`` carries the exported blocks of a
    finished request that asked for them. ``logprobs``: of the new tokens; ``prompt_logprobs``:
    of the prompt tokens at positions ``prompt_start``, ``prompt_start + 1``, ... (when the
    request asked for them). ``drafted``: the step verified a draft; ``draft``: the MTP module's
    guess of the next token after the step."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    queued_s: float
    step_measured_s: float
    step_modeled_s: float
    kv: list[torch.Tensor] | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    prompt_start: int = 0
    drafted: bool = False
    draft: int | None = None


@dataclasses.dataclass(frozen=True)
class KvPrefix:
    """KV of the first ``tokens`` tokens, held by the pool: ``fetch`` reads it when the request is
    admitted to blocks (not while it waits), again after a preemption. It returns [layers, n, C+R]
    per block, all full but maybe the last, for a leading run of at most ``tokens`` tokens (fewer
    when blocks were evicted: the rest is recomputed)."""

    tokens: int
    fetch: Callable[[], Awaitable[list[torch.Tensor]]]


@dataclasses.dataclass(eq=False)
class Request:
    """``token_ids`` are every token known so far; the KV of the first ``prefix.tokens`` of them
    comes from the pool (``prefix``), written to the die once fetched. The rest are computed in
    chunks of at most ``chunk_tokens``; the step that reaches the last known token samples the
    next one (and verifies the MTP module's ``draft`` after it, when the instance speculates).
    ``export_from_block``: on finishing, the KV of the blocks from there on is read back
    and handed out in the final event."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    stop: StopRule
    prefix: KvPrefix | None = None
    chunk_tokens: int = 2**31
    export_from_block: int | None = None
    draft: int | None = None         # the MTP module's guess of the next token (set by each step)
    # Scheduler-owned from here on.
    state: RequestState = RequestState.WAITING
    die: int | None = None
    blocks: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    new_tokens: int = 0
    preemptions: int = 0
    admissions: int = 0              # times admitted to blocks (a fetched prefix belongs to one)
    waiting_since: float = dataclasses.field(default_factory=time.perf_counter)
    trace_context: object = None     # the submitter's OpenTelemetry context (engine.step spans join it)

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise FieldError("token_ids", "the request has no tokens")
        if self.prefix_tokens >= len(self.token_ids):
            raise FieldError("kv", f"{self.prefix_tokens} tokens of KV leave none of the "
                             f"{len(self.token_ids)} tokens to compute")

    @property
    def prefix_tokens(self) -> int:
        return self.prefix.tokens if self.prefix is not None else 0

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def next_chunk(self, budget: int) -> list[int]:
        """The tokens this request would compute next, at most ``budget`` of them."""
        end = min(len(self.token_ids), self.num_computed + self.chunk_tokens, self.num_computed + budget)
        return self.token_ids[self.num_computed:end]
