"""The instance's scheduler: the one owner of every request's state and of the dies' blocks.

Pure Python, no I/O: the step loop (loop.py) asks it for a ``StepPlan`` (step.py), runs the plan
on the dies, and hands the outputs back with ``complete``. Aborts (cancel, disconnect) and
fetched prefixes are queued (``abort``, ``prefix_arrived``) and applied between steps
(``apply_aborts``, ``apply_arrivals``), never while a step runs. Each event for a request's
consumer goes through ``deliver``.

Each step: running requests (oldest first) take their next chunk within the token budget,
allocating blocks as they grow; when a die is out of blocks the newest running request on it is
preempted (its blocks freed, its KV recomputed when it runs again). Then waiting requests are
admitted, oldest (and preempted) first, while their blocks fit on a die; one whose prefix KV is
in the pool (``Request.prefix``) holds its blocks while the loop fetches it (FETCHING), and steps
once it has arrived.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable

import torch

from cloudmatrix.errors import FieldError
from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.request import Request, RequestState, StepEvent
from cloudmatrix.instance.step import ScheduledChunk, SequenceOutput, StepPlan, StepTiming
from cloudmatrix.rpc.errors import ResourceExhausted
from cloudmatrix.sampling_params import FinishReason

Deliver = Callable[[Request, "StepEvent | Exception"], None]  # hands an event to the request's consumer


@dataclasses.dataclass(frozen=True)
class SchedulerLimits:
    """The scheduler's part of the instance settings (validated there: InstanceSettings)."""

    max_running: int = 64          # requests holding blocks and stepping
    max_waiting: int = 256         # beyond this, add() answers ResourceExhausted
    max_step_tokens: int = 1024    # tokens of all requests in one step (draft tokens included)
    speculative_tokens: int = 0    # 1: the dies run the MTP module; a request's draft is verified


@dataclasses.dataclass
class SpeculationCounts:
    """Drafts verified and accepted, in all (vLLM's spec_decode counters; one draft position)."""

    drafts: int = 0
    accepted: int = 0


class Scheduler:
    def __init__(self, blocks: BlockManager, limits: SchedulerLimits, deliver: Deliver) -> None:
        self.blocks, self.limits, self.deliver = blocks, limits, deliver
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []       # RUNNING and FETCHING: holding blocks
        self.requests: dict[str, Request] = {}
        self._aborts: dict[str, FinishReason] = {}
        self._arrivals: list[tuple[Request, int, list[torch.Tensor] | Exception]] = []
        self._released: list[tuple[int, str]] = []
        self.preemptions = 0
        self.speculation = SpeculationCounts()

    def reset(self, blocks: BlockManager) -> None:
        """Start over on freshly loaded dies (every request must have been failed first)."""
        if self.requests:
            raise RuntimeError(f"{len(self.requests)} requests still live at reset")
        self.blocks, self._released = blocks, []  # reloaded dies hold no sequence

    def add(self, request: Request) -> None:
        """Queue a new request. ValueError when it can never fit a die; ResourceExhausted when
        the queue is full."""
        if request.request_id in self.requests:
            raise FieldError("request_id", f"{request.request_id!r} is already in this instance")
        tokens, stop = len(request.token_ids), request.stop
        most = self.blocks.blocks_for(min(tokens + stop.max_new_tokens - request.new_tokens, stop.context_limit))
        biggest = max(self.blocks.total, default=0)
        if self.blocks.blocks_for(tokens) > biggest:
            raise FieldError("token_ids", f"{tokens} tokens need more KV blocks than a die of this instance holds "
                             f"({biggest} of {self.blocks.block_size} tokens)")
        if most > biggest:
            raise FieldError("max_tokens", f"{tokens} tokens plus up to {stop.max_new_tokens - request.new_tokens} "
                             f"more need {most} KV blocks; a die of this instance holds {biggest} of "
                             f"{self.blocks.block_size} tokens")
        if len(self.waiting) >= self.limits.max_waiting:
            raise ResourceExhausted(f"queue full: {len(self.waiting)} requests waiting")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> bool:
        """Ask for a request to end with ``reason`` before the next step; False if it is unknown
        or already finished."""
        if request_id not in self.requests:
            return False
        self._aborts.setdefault(request_id, reason)
        return True

    def apply_aborts(self) -> None:
        aborts, self._aborts = self._aborts, {}
        for request_id, reason in aborts.items():
            request = self.requests.get(request_id)
            if request is not None:
                self._finish(request, StepEvent((), reason, 0.0, 0.0, 0.0))

    def prefix_arrived(self, request: Request, admission: int, outcome: list[torch.Tensor] | Exception) -> None:
        """Queue the outcome of a prefix fetch started at the request's ``admission``-th admission."""
        self._arrivals.append((request, admission, outcome))

    def apply_arrivals(self) -> list[tuple[Request, list[torch.Tensor]]]:
        """Fetched prefixes join their requests, which step from the next plan on; returns each
        such request with the KV to write into its first blocks before that step. A failed fetch
        fails its request; one for a request preempted or ended since is dropped."""
        arrivals, self._arrivals = self._arrivals, []
        arrived = []
        for request, admission, outcome in arrivals:
            if request.state is not RequestState.FETCHING or request.admissions != admission:
                continue
            if isinstance(outcome, Exception):
                self._finish(request, outcome)
                continue
            tokens = sum(kv.shape[1] for kv in outcome)
            if tokens > request.prefix_tokens or len(outcome) > len(request.blocks):
                self._finish(request, FieldError("kv", f"{tokens} tokens of KV in {len(outcome)} blocks arrived "
                                                 f"for a prefix of {request.prefix_tokens}"))
                continue
            arrived.append((request, outcome))
            request.num_computed, request.state = tokens, RequestState.RUNNING
            if request.export_from_block is not None:
                request.export_from_block = min(request.export_from_block, len(outcome))
        return arrived

    def schedule(self) -> StepPlan:
        plan, budget = StepPlan(), self.limits.max_step_tokens
        for request in list(self.running):
            if budget and request.state is RequestState.RUNNING:
                budget -= self._schedule_running(request, budget, plan)
        while self.waiting and budget and len(self.running) < self.limits.max_running:
            request = self.waiting[0]
            if not self._admit(request, plan):
                break
            self.waiting.popleft()
            if request.state is RequestState.RUNNING:
                budget -= self._schedule_running(request, budget, plan)
        if plan.chunks:  # told with the next Forward; an empty plan runs none
            # A request readmitted to the same die in this plan goes to it in full (which replaces
            # what the die held): telling the die to forget it could reach it after that input,
            # from the other microbatch's Forward.
            stepped = {(c.request.die, c.request.request_id) for c in plan.chunks}
            plan.released, self._released = [r for r in self._released if r not in stepped], []
        return plan

    def _schedule_running(self, request: Request, budget: int, plan: StepPlan) -> int:
        chunk = request.next_chunk(budget)
        end = request.num_computed + len(chunk)
        sample = end == len(request.token_ids)
        draft = request.draft if sample and budget > len(chunk) and self._may_draft(request) else None
        needed = self.blocks.blocks_for(end + (draft is not None)) - len(request.blocks)
        while not self.blocks.can_allocate(request.die, needed):
            victim = self._newest_running_on(request.die)
            self._preempt(victim)
            if victim is request:
                return 0
        request.blocks += self.blocks.allocate(request.die, needed)
        following = None
        if (request.sampling.prompt_logprobs is not None or self.limits.speculative_tokens) and not sample:
            following = request.token_ids[end]  # the MTP module reads it at the chunk's last position
        scheduled = ScheduledChunk(request, chunk, request.num_computed, sample, following, draft)
        plan.chunks.append(scheduled)
        return scheduled.slots

    def _may_draft(self, request: Request) -> bool:
        """A draft is verified only where both tokens it may give are wanted: never beyond
        max_tokens or the context."""
        stop = request.stop
        return (request.draft is not None and bool(self.limits.speculative_tokens)
                and request.new_tokens + 2 <= stop.max_new_tokens and len(request.token_ids) + 2 <= stop.context_limit)

    def _admit(self, request: Request, plan: StepPlan) -> bool:
        """Give a waiting request blocks for all its known tokens on the roomiest die; one with a
        prefix in the pool waits for it (FETCHING, in ``plan.fetches``). False (it keeps waiting)
        when no die has room now."""
        needed = self.blocks.blocks_for(len(request.token_ids))
        die = self.blocks.roomiest_die(needed)
        if die is None:
            return False
        request.die, request.blocks = die, self.blocks.allocate(die, needed)
        request.num_computed, request.admissions = 0, request.admissions + 1
        request.state = RequestState.FETCHING if request.prefix is not None else RequestState.RUNNING
        if request.prefix is not None:
            plan.fetches.append(request)
        self.running.append(request)
        return True

    def _newest_running_on(self, die: int) -> Request:
        return next(r for r in reversed(self.running) if r.die == die)

    def _preempt(self, request: Request) -> None:
        """Drop a running request's KV and put it first in line; when readmitted it fetches its
        prefix again (if any) and recomputes the rest."""
        self._release(request)
        request.blocks, request.die, request.num_computed, request.draft = [], None, 0, None
        request.state, request.preemptions = RequestState.WAITING, request.preemptions + 1
        self.preemptions += 1
        self.waiting.appendleft(request)

    def complete(self, plan: StepPlan, outputs: dict[str, SequenceOutput],
                 timing: StepTiming) -> list[tuple[Request, StepEvent]]:
        """Apply a step's outputs: the new tokens, events to every request, finished ones freed.
        Returns the finished requests that want their KV exported first (with their last event);
        the caller reads it and calls ``finish_exported``."""
        to_export = []
        for chunk in plan.chunks:
            request = chunk.request
            out = outputs.get(request.request_id, _NO_OUTPUT)
            tokens = out.token_ids if chunk.sample else ()
            accepted = chunk.draft is not None and len(tokens) == 2
            request.num_computed += len(chunk.token_ids) + accepted  # an accepted draft's KV stays
            if chunk.draft is not None:
                self.speculation.drafts += 1
                self.speculation.accepted += accepted
            tokens, reason = self._append(request, tokens)
            request.draft = out.draft if tokens else request.draft
            event = StepEvent(tokens, reason, timing.started - request.waiting_since, timing.measured_s,
                              timing.modeled_s, logprobs=out.logprobs[:len(tokens)],
                              prompt_logprobs=out.prompt_logprobs, prompt_start=chunk.start + 1,
                              drafted=chunk.draft is not None, draft=request.draft)
            request.waiting_since = timing.started + timing.measured_s
            if reason is not None and request.export_from_block is not None:
                to_export.append((request, event))
            elif reason is not None:
                self._finish(request, event)
            else:
                self.deliver(request, event)
        return to_export

    def _append(self, request: Request, tokens: tuple[int, ...]) -> tuple[tuple[int, ...], FinishReason | None]:
        """Append the step's tokens up to the first that ends the request; returns those kept and
        the finish reason (None while it goes on)."""
        for kept, token in enumerate(tokens, 1):
            request.token_ids.append(token)
            request.new_tokens += 1
            reason = request.stop.reason(token, request.new_tokens, len(request.token_ids))
            if reason is not None:
                return tokens[:kept], reason
        return tokens, None

    def export_ranges(self, request: Request) -> list[tuple[int, int]]:
        """(block id, valid tokens) of the blocks to export: from ``export_from_block`` to the
        last block holding computed KV."""
        size, computed = self.blocks.block_size, request.num_computed
        last = self.blocks.blocks_for(computed)
        return [(request.blocks[i], min(size, computed - i * size)) for i in range(request.export_from_block, last)]

    def finish_exported(self, request: Request, event: StepEvent, kv: list[torch.Tensor]) -> None:
        self._finish(request, dataclasses.replace(event, kv=kv))

    def _finish(self, request: Request, outcome: StepEvent | Exception) -> None:
        """Free the request's blocks, forget it, and give its consumer the last item."""
        if request.state in (RequestState.RUNNING, RequestState.FETCHING):
            self._release(request)
        elif request.state is RequestState.WAITING:
            self.waiting.remove(request)
        request.blocks, request.state = [], RequestState.FINISHED
        self.requests.pop(request.request_id, None)
        self.deliver(request, outcome)

    def _release(self, request: Request) -> None:
        """Free a request's blocks; its die forgets the sequence at the next step."""
        self.blocks.free(request.die, request.blocks)
        self.running.remove(request)
        self._released.append((request.die, request.request_id))

    def fail(self, request: Request, error: Exception) -> None:
        """End one request with ``error`` (its consumer raises it)."""
        if not request.finished:
            self._finish(request, error)

    def fail_all(self, error: Exception) -> None:
        for request in list(self.requests.values()):
            self.fail(request, error)
        self._aborts.clear()
        self._arrivals.clear()


_NO_OUTPUT = SequenceOutput()
