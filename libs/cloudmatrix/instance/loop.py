"""The step loop of an instance: the only task that changes request state or touches the dies.

    while serving:
        apply aborts and fetched prefixes (writing them to the dies); plan = scheduler.schedule();
        start the plan's prefix fetches; run the plan on the dies; scheduler.complete(...)

Requests reach it through ``submit`` (which returns the request's events) and ``abort``; the
loop keeps each request's outbox by request id and applies everything between steps. Prefix
fetches run beside the steps and join at the next iteration. A step whose dies fail ends every request of the instance
with ``InstanceUnavailable`` and turns the instance NOT_SERVING; the loop then probes the dies
until all answer, reloads them, and serves again. A monitor probes the dies between steps too, so
a die that dies while the instance is idle is noticed. If the loop itself crashes, the instance
turns NOT_SERVING for good, says why in the log, and fails every request.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from cloudmatrix.errors import InternalError
from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.driver import DieCallsFailed, StepFailed
from cloudmatrix.instance.request import Request, StepEvent
from cloudmatrix.instance.scheduler import Scheduler, SchedulerLimits
from cloudmatrix.instance.step import Driver, ScheduledChunk, StepOutput, StepPlan, StepTiming
from cloudmatrix.rpc.errors import PeerUnavailable, ResourceExhausted
from cloudmatrix.sampling_params import FinishReason
from cloudmatrix.telemetry.context import span_link

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer(__name__)


class InstanceUnavailable(PeerUnavailable):
    """The instance cannot serve now (a die is down and it is recovering, or it stopped)."""


class LoopState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RECOVERING = "recovering"
    BROKEN = "broken"          # the loop crashed: NOT_SERVING until the process restarts
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """The step loop's part of the instance settings (validated there: InstanceSettings and the
    decode config's microbatches)."""

    name: str = "instance"             # the instance id, in messages and logs
    microbatches: int = 1              # 2: each step's requests run as two concurrent microbatches
    probe_interval_s: float = 1.0      # die health probes while serving, and while recovering
    probe_timeout_s: float = 10.0
    batch_wait_s: float = 0.0          # an idle instance's first step waits until no request has
                                       # arrived for this long (at most 10x it): a burst lands in one step


SLOW_PROBES_DOWN = 3
DIES_WAIT_LOG_EVERY = 10  # probes between two "waiting for the dies" log lines at start


Loader = Callable[[], Awaitable[BlockManager]]
HealthHook = Callable[[bool], Awaitable[None]]
StepHook = Callable[[float, float, int, dict], None]  # measured s, modeled s, sequences, die phases


class StepLoop:
    def __init__(self, driver: Driver, load: Loader, limits: SchedulerLimits, settings: LoopSettings,
                 on_health: HealthHook | None = None, on_step: StepHook | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.driver, self._load, self.limits, self.settings = driver, load, limits, settings
        self.on_health, self.on_step = on_health, on_step
        self._sleep = sleep                 # the waits for a burst to arrive (tests pass their own clock)
        self.scheduler: Scheduler | None = None
        self.state, self.why = LoopState.STARTING, "loading the dies"
        self.steps = 0
        self.recent = (0.0, 0.0)           # (measured, modeled) seconds of the last step
        self._down: str | None = None       # set when a die is found down; the loop recovers
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._outboxes: dict[str, asyncio.Queue] = {}   # request id -> its events, until the last
        self._fetches: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Wait until every die answers (an instance's processes may start in any order, as the
        containers of one Kubernetes pod do), load them and start stepping; raises when that first
        load fails."""
        await self._wait_for_dies()
        self.scheduler = Scheduler(await self._load(), self.limits, self._deliver)
        self.state, self.why = LoopState.SERVING, ""
        self._tasks = [asyncio.create_task(self._guarded()), asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        for task in (*self._tasks, *self._fetches):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._fetches, return_exceptions=True)
        self.state, self.why = LoopState.STOPPED, "stopped"
        if self.scheduler is not None:
            self.scheduler.fail_all(InstanceUnavailable(f"{self.settings.name}: the instance is stopping"))

    @property
    def serving(self) -> bool:
        return self.state is LoopState.SERVING

    def check_admission(self) -> None:
        """Raise what ``submit`` would for any request now: InstanceUnavailable while not serving,
        ResourceExhausted when the queue is full."""
        if not self.serving:
            raise InstanceUnavailable(f"{self.settings.name} is {self.state.value}: {self.why}")
        if len(self.scheduler.waiting) >= self.limits.max_waiting:
            raise ResourceExhausted(f"{self.settings.name}: queue full ({len(self.scheduler.waiting)} waiting)")

    def submit(self, request: Request) -> AsyncIterator[StepEvent]:
        """Queue a request (FieldError / ResourceExhausted from the scheduler; InstanceUnavailable
        while the instance is not serving); returns its step events up to its finish, which raise
        the error that ended it, if any."""
        self.check_admission()
        request.trace_context = otel_context.get_current()
        outbox = asyncio.Queue()
        self.scheduler.add(request)
        self._outboxes[request.request_id] = outbox
        self._wake.set()
        return _events(outbox)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> bool:
        """End a request before the next step (cancel, client gone); False if unknown."""
        if self.scheduler is None or not self.scheduler.abort(request_id, reason):
            return False
        self._wake.set()
        return True

    def _deliver(self, request: Request, item: StepEvent | Exception) -> None:
        """Hand a step's event to its consumer on the event loop's next turn: the loop issues the
        next step's Forward calls first, and the request streams (one gRPC write each) run while
        the dies compute instead of delaying the step."""
        last = isinstance(item, Exception) or item.finish_reason is not None
        outbox = self._outboxes.pop(request.request_id, None) if last else self._outboxes.get(request.request_id)
        if outbox is not None:
            asyncio.get_running_loop().call_soon(outbox.put_nowait, item)

    async def _guarded(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the scheduling loop crashed; the instance stops serving",
                          extra={"instance": self.settings.name})
            await self._set_state(LoopState.BROKEN, "its scheduling loop crashed (see the instance's log)")
            self.scheduler.fail_all(InstanceUnavailable(f"{self.settings.name}: {self.why}"))

    async def _run(self) -> None:
        while True:
            if self._down is not None:
                await self._recover(self._down)
                continue
            if self.settings.batch_wait_s and self.scheduler.waiting and not self.scheduler.running:
                await self._gather_burst()  # idle until now: let the rest of a burst arrive
            self.scheduler.apply_aborts()
            if not await self._write_arrived_prefixes():
                continue
            plan = self.scheduler.schedule()
            for request in plan.fetches:
                self._start_fetch(request)
            if plan.empty:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._step(plan)

    def _start_fetch(self, request: Request) -> None:
        async def fetch(admission: int) -> None:
            token = otel_context.attach(request.trace_context)  # its pool calls join the request's trace
            try:
                outcome = await request.prefix.fetch()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the request fails with it; the instance keeps serving
                outcome = err
            finally:
                otel_context.detach(token)
            self.scheduler.prefix_arrived(request, admission, outcome)
            self._wake.set()

        task = asyncio.create_task(fetch(request.admissions))
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _write_arrived_prefixes(self) -> bool:
        """Apply fetched prefixes and write them to the dies; False when that failed (their
        requests fail, or the loop recovers when a die did not answer)."""
        arrived = self.scheduler.apply_arrivals()
        writes: dict[int, list] = {}
        for request, kv in arrived:
            writes.setdefault(request.die, []).extend(zip(request.blocks, kv))
        if not writes:
            return True
        try:
            await self.driver.write_blocks(writes)
        except StepFailed as failure:
            self._down = failure.summary
            return False
        except Exception as err:  # the dies answered with an error, or a bug here
            log.error("writing fetched prefixes failed; their requests fail", extra={"instance": self.settings.name},
                      exc_info=err)
            for request, _ in arrived:
                self.scheduler.fail(request, InternalError(f"{self.settings.name}: writing its KV failed"))
            return False
        return True

    async def _gather_burst(self) -> None:
        """Wait while requests keep arriving (gaps under batch_wait_s), for at most 10 gaps."""
        for _ in range(10):
            arrived = len(self.scheduler.waiting)
            await self._sleep(self.settings.batch_wait_s)
            if len(self.scheduler.waiting) == arrived:
                return

    async def _step(self, plan: StepPlan) -> None:
        started = time.perf_counter()
        try:
            results = await asyncio.gather(*(self._forward(chunks, plan.released if mb == 0 else [], mb)
                                             for mb, chunks in self._microbatches(plan)))
            outputs = {k: v for r in results for k, v in r.outputs.items()}
            measured, modeled = time.perf_counter() - started, max(r.modeled_s for r in results)
            await self._export(self.scheduler.complete(plan, outputs, StepTiming(started, measured, modeled)))
        except StepFailed as failure:
            log.warning("step failed", extra={"instance": self.settings.name, "error": str(failure)})
            self._down = failure.summary
            return
        except Exception as err:  # the dies answered with an error (StepError), or a bug in this loop
            log.error("a step failed on an error; its requests fail, the instance keeps serving",
                      extra={"instance": self.settings.name}, exc_info=err)
            for chunk in plan.chunks:
                self.scheduler.fail(chunk.request, InternalError(f"{self.settings.name}: its step failed"))
            return
        self.steps, self.recent = self.steps + 1, (measured, modeled)
        if self.on_step is not None:
            phases: dict[str, float] = {}
            for result in results:  # microbatches add up (they may overlap in time)
                for k, v in result.phases.items():
                    phases[k] = phases.get(k, 0.0) + v
            self.on_step(measured, modeled, len(plan.chunks), phases)

    async def _export(self, finished: list[tuple[Request, StepEvent]]) -> None:
        """Read back the KV of the requests that finished wanting it: one ReadBlocks per die for
        all of them (the dies at once), then each request finishes with its own blocks."""
        if not finished:
            return
        ranges = [self.scheduler.export_ranges(request) for request, _ in finished]
        dies = sorted({request.die for request, _ in finished})
        wanted = {die: [r for (request, _), rs in zip(finished, ranges) if request.die == die for r in rs]
                  for die in dies}
        read = dict(zip(dies, await asyncio.gather(*(self.driver.read_blocks(d, wanted[d]) for d in dies))))
        for (request, event), rs in zip(finished, ranges):
            kv, read[request.die] = read[request.die][:len(rs)], read[request.die][len(rs):]
            self.scheduler.finish_exported(request, event, kv)

    def _microbatches(self, plan: StepPlan) -> list[tuple[int, list[ScheduledChunk]]]:
        if self.settings.microbatches == 2 and len(plan.chunks) > 1:
            return [(0, plan.chunks[0::2]), (1, plan.chunks[1::2])]
        return [(0, plan.chunks)]

    async def _forward(self, chunks: list[ScheduledChunk], released: list[tuple[int, str]],
                       microbatch: int) -> StepOutput:
        """One microbatch on every die, in the trace of its oldest request, linking the others; the
        span counts the MTP draft tokens the step verified and accepted."""
        links = [link for c in chunks[1:] if (link := span_link(c.request.trace_context)) is not None]
        drafted = [c.request.request_id for c in chunks if c.draft is not None]
        attributes = {"sequences": len(chunks), "tokens": sum(len(c.token_ids) for c in chunks),
                      "request_ids": [c.request.request_id for c in chunks], "microbatch": microbatch,
                      "draft_tokens": len(drafted)}
        with _TRACER.start_as_current_span("engine.step", context=chunks[0].request.trace_context, links=links,
                                           attributes=attributes) as span:
            output = await self.driver.forward(chunks, released, microbatch)
            span.set_attribute("accepted_tokens", sum(len(output.outputs[r].token_ids) == 2 for r in drafted
                                                      if r in output.outputs))
            return output

    async def _recover(self, reason: str) -> None:
        """Fail every request, wait until every die answers, reload them all, serve again."""
        log.warning("a die is down; the instance stops serving until it is back",
                    extra={"instance": self.settings.name, "reason": reason})
        await self._set_state(LoopState.RECOVERING, reason)
        self.scheduler.fail_all(InstanceUnavailable(f"{self.settings.name}: {reason}; the instance is recovering"))
        while True:
            blocks = await self._reload_when_all_answer()
            if blocks is not None:
                break
            await asyncio.sleep(self.settings.probe_interval_s)
        self.scheduler.reset(blocks)
        self._down = None
        await self._set_state(LoopState.SERVING, "")
        log.info("the instance serves again", extra={"instance": self.settings.name})

    async def _wait_for_dies(self) -> None:
        for waited in itertools.count():
            missing = [p.describe() for p in await self.driver.probe(self.settings.probe_timeout_s) if not p.answered]
            if not missing:
                return
            if waited % DIES_WAIT_LOG_EVERY == 0:
                log.info("waiting for the dies to answer", extra={"instance": self.settings.name,
                                                                   "missing": ", ".join(missing)})
            await asyncio.sleep(self.settings.probe_interval_s)

    async def _reload_when_all_answer(self) -> BlockManager | None:
        probes = await self.driver.probe(self.settings.probe_timeout_s)
        if not all(p.answered for p in probes):
            return None
        try:
            return await self._load()
        except (grpc.aio.AioRpcError, DieCallsFailed) as err:
            log.warning("reloading the dies failed; retrying", extra={"instance": self.settings.name,
                                                                      "error": str(err)})
            return None

    async def _watch(self) -> None:
        """Probe the dies while serving; a die that is gone or restarted sends the loop recovering.
        A die that is merely slow to answer (a busy machine) must miss ``SLOW_PROBES_DOWN`` probes
        in a row first."""
        slow = [0] * len(self.driver.dies)
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            if not self.serving or self._down is not None:
                continue
            try:
                probes = await self.driver.probe(self.settings.probe_timeout_s)
            except Exception:  # a probe must never end the watch
                log.exception("die probe failed", extra={"instance": self.settings.name})
                continue
            deadline = grpc.StatusCode.DEADLINE_EXCEEDED
            slow = [n + 1 if p.code == deadline else 0 for n, p in zip(slow, probes)]
            bad = [p for p, n in zip(probes, slow) if not p.healthy and (p.code != deadline or n >= SLOW_PROBES_DOWN)]
            if bad and self.serving and self._down is None:
                self._down = ", ".join(p.describe() for p in bad)
                self._wake.set()

    async def _set_state(self, state: LoopState, why: str) -> None:
        was_serving = self.serving
        self.state, self.why = state, why
        if self.on_health is not None and was_serving != self.serving:
            await self.on_health(self.serving)


async def _events(outbox: asyncio.Queue) -> AsyncIterator[StepEvent]:
    while True:
        item = await outbox.get()
        if isinstance(item, Exception):
            raise item
        yield item
        if item.finish_reason is not None:
            return

