"""Packs the work of concurrent requests into shared engine steps (continuous batching).

Each request submits its next piece (a prefill chunk or one decode token) and awaits its output;
a single loop takes everything submitted so far (up to a token budget) and runs it as one step of
the instance. A request never has two pieces in one step: it submits the next after the last one
returned.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry import trace

from cloudmatrix.instance.driver import InstanceDriver, StepInput
from cloudmatrix.telemetry.context import span_link

_TRACER = trace.get_tracer(__name__)


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """One request's share of a step: its output, how long it waited for the step, and the step's
    measured and modeled seconds (the slowest die's)."""

    output: object
    queued_s: float
    step_measured_s: float
    step_modeled_s: float


@dataclasses.dataclass
class _Pending:
    item: StepInput
    future: asyncio.Future
    submitted: float
    trace_context: otel_context.Context


class StepBatcher:
    def __init__(self, driver: InstanceDriver, max_step_tokens: int, microbatches: int = 1) -> None:
        """microbatches = 2: a step's requests are split in two microbatches that run at once, so
        one's attention overlaps the other's dispatch/combine (the paper's decode pipelining)."""
        if microbatches not in (1, 2):
            raise ValueError(f"microbatches must be 1 or 2, got {microbatches}")
        self.driver, self.max_step_tokens, self.microbatches = driver, max_step_tokens, microbatches
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.recent = (0.0, 0.0)  # (measured, modeled) seconds of the last step
        self.on_step: Callable[[float, float], None] | None = None  # e.g. metrics

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def waiting_tokens(self) -> int:
        return sum(len(p.item.token_ids) for p in self._queue)

    async def submit(self, item: StepInput) -> StepOutcome:
        """Run ``item`` in the next step with room for it."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, future, time.perf_counter(), otel_context.get_current()))
        self._wake.set()
        return await future

    def _take(self) -> list[_Pending]:
        taken, tokens = [], 0
        for pending in list(self._queue):
            size = len(pending.item.token_ids)
            if taken and tokens + size > self.max_step_tokens:
                break
            taken.append(pending)
            tokens += size
        self._queue = self._queue[len(taken):]
        return taken

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [p for p in self._take() if not p.future.cancelled()]
                if len(batch) > 1 and self.microbatches == 2:
                    await asyncio.gather(self._run(batch[0::2], 0), self._run(batch[1::2], 1))
                elif batch:
                    await self._run(batch, 0)

    async def _run(self, batch: list[_Pending], microbatch: int) -> None:
        """The step runs in the trace of its oldest request and links every other one."""
        links = [link for p in batch[1:] if (link := span_link(p.trace_context)) is not None]
        attributes = {"sequences": len(batch), "tokens": sum(len(p.item.token_ids) for p in batch),
                      "request_ids": [p.item.seq_id for p in batch]}
        with _TRACER.start_as_current_span("engine.step", context=batch[0].trace_context, links=links,
                                           attributes={**attributes, "microbatch": microbatch}):
            await self._step(batch, microbatch)

    async def _step(self, batch: list[_Pending], microbatch: int) -> None:
        started = time.perf_counter()
        try:
            outputs = await self.driver.step([p.item for p in batch], microbatch=microbatch)
        except Exception as exc:  # every request in the failed step learns why
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self.steps += 1
        measured = time.perf_counter() - started
        modeled = max(r.timing.modeled_s for r in self.driver.replies_by_microbatch[microbatch])
        self.recent = (measured, modeled)
        if self.on_step is not None:
            self.on_step(measured, modeled)
        for p in batch:
            if not p.future.done():
                p.future.set_result(StepOutcome(outputs[p.item.seq_id], started - p.submitted, measured, modeled))
