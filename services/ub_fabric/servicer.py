"""gRPC servicer of the UB fabric: one bidirectional Attach stream per die.

Telemetry is per round, not per frame: one span per completed all-to-all round (in the trace of
the step that sent it: the first frame's traceparent), and the per-link Prometheus counters are
bound once per link."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
from opentelemetry import trace
from prometheus_client import Counter

from cloudmatrix.telemetry.context import context_from_traceparent
from cmx.common.v1 import common_pb2
from cmx.fabric.v1 import fabric_pb2, fabric_pb2_grpc
from services.ub_fabric.core import FabricCore

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer(__name__)

BYTES = Counter("cmx_fabric_bytes", "Frame bytes routed die to die", ["src", "dst"])
FRAMES = Counter("cmx_fabric_frames", "Frames routed die to die, empty ones included", ["src", "dst"])
MODELED = Counter("cmx_fabric_modeled_transfer_seconds", "Modeled UB transfer seconds", ["src", "dst"])


def _round_key(frame: fabric_pb2.Frame) -> tuple[int, int, int, int]:
    r = frame.round
    return r.step, r.layer, r.microbatch, r.kind


@dataclasses.dataclass
class _RoundSpan:
    """A traced round being routed: its first frame's trace context and time, frames and bytes."""

    traceparent: str
    started_ns: int
    frames: int = 0
    bytes: int = 0


class UbFabricServicer(fabric_pb2_grpc.UbFabricServicer):
    def __init__(self, core: FabricCore, hello_timeout_s: float) -> None:
        self.core = core
        self.hello_timeout_s = hello_timeout_s
        self._links: dict[tuple[int, int], tuple] = {}         # (src, dst) -> bound counters
        self._rounds: dict[tuple[str, tuple], _RoundSpan] = {}  # traced rounds in flight

    async def Attach(self, request_iterator, context):
        hello = await self._read_hello(request_iterator, context)
        group, die = hello.group, hello.die_id
        try:
            queue, to_greet = self.core.attach(group, die, hello.world_size)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("die attached", extra={"group": group, "die": die, "world_size": hello.world_size})
        for member in to_greet:
            member.queue.put_nowait((fabric_pb2.Frame(src_die=member.die_id, dst_die=member.die_id, hello=hello), None))
        reader = asyncio.create_task(self._pump(request_iterator, group, die, queue))
        try:
            async for frame in self._outbound(queue, group, die):
                yield frame
        finally:
            reader.cancel()
            self._detach(group, die, queue, "stream closed")

    async def _read_hello(self, request_iterator, context) -> fabric_pb2.Hello:
        try:
            first = await asyncio.wait_for(anext(request_iterator), self.hello_timeout_s)
        except (StopAsyncIteration, asyncio.TimeoutError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "attach: the first frame must be a Hello")
        if not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "attach: the first frame must be a Hello")
        return first.hello

    async def _outbound(self, queue: asyncio.Queue, group: str, die: int):
        """Frames for this die until None: its own stream ended (the pump's last word) or a newer
        attachment of the same die replaced it."""
        while True:
            item = await queue.get()
            if item is None:
                return
            frame, routed_at = item
            if routed_at is not None:
                self.core.record_delivery(group, frame.src_die, die, time.perf_counter() - routed_at)
            yield frame

    async def _pump(self, request_iterator, group: str, die: int, own: asyncio.Queue) -> None:
        """Route every frame this die sends until it hangs up or sends a bad frame; then end the
        die's outbound stream too."""
        try:
            await self._route_all(request_iterator, group, die)
        finally:
            own.put_nowait(None)

    async def _route_all(self, request_iterator, group: str, die: int) -> None:
        async for frame in request_iterator:
            frame.src_die = die
            try:
                member, modeled = self.core.route(group, die, frame.dst_die, _round_key(frame), frame.ByteSize(),
                                                  common_pb2.RoundKind.Name(frame.round.kind))
            except ValueError as exc:
                log.warning("bad frame dropped; detaching the die", extra={"die": die, "error": str(exc)})
                return
            size = frame.ByteSize()
            if frame.traceparent:
                self._trace_round(frame, group, size)
            bytes_counter, frames_counter, modeled_counter = self._counters(die, frame.dst_die)
            bytes_counter.inc(size)
            frames_counter.inc()
            modeled_counter.inc(modeled)
            if member is not None:
                frame.modeled_arrival_s = frame.modeled_send_s + modeled
                member.queue.put_nowait((frame, time.perf_counter()))

    def _counters(self, src: int, dst: int) -> tuple:
        counters = self._links.get((src, dst))
        if counters is None:
            labels = (str(src), str(dst))
            counters = self._links[(src, dst)] = (BYTES.labels(*labels), FRAMES.labels(*labels),
                                                  MODELED.labels(*labels))
        return counters

    def _trace_round(self, frame: fabric_pb2.Frame, group: str, size: int) -> None:
        """Count a traced frame into its round; the round's last frame ends one span for it all."""
        key = (group, _round_key(frame))
        span = self._rounds.get(key)
        if span is None:
            span = self._rounds[key] = _RoundSpan(frame.traceparent, time.time_ns())
        span.frames, span.bytes = span.frames + 1, span.bytes + size
        g = self.core.groups.get(group)
        if g is None or span.frames < g.world_size * (g.world_size - 1):
            return
        del self._rounds[key]
        r = frame.round
        kind = common_pb2.RoundKind.Name(r.kind).removeprefix("ROUND_KIND_").lower()
        _TRACER.start_span(f"fabric.{kind}", context=context_from_traceparent(span.traceparent),
                           start_time=span.started_ns,
                           attributes={"group": group, "step": r.step, "layer": r.layer, "microbatch": r.microbatch,
                                       "frames": span.frames, "bytes": span.bytes}).end()

    def _detach(self, group: str, die: int, queue: asyncio.Queue, reason: str) -> None:
        remaining = self.core.detach(group, die, queue)
        for key in [k for k in self._rounds if k[0] == group]:  # rounds in flight can no longer complete
            del self._rounds[key]
        if not remaining:
            return
        log.info("die detached", extra={"group": group, "die": die, "reason": reason})
        notice = fabric_pb2.Detached(die_id=die, reason=reason)
        for member in remaining:
            member.queue.put_nowait((fabric_pb2.Frame(src_die=die, dst_die=member.die_id, detached=notice), None))

    async def Stats(self, request, context):
        links, rounds, attached = self.core.stats(reset=request.reset)
        return fabric_pb2.StatsReply(
            links=[fabric_pb2.LinkStats(src_die=src, dst_die=dst, bytes=c.bytes, frames=c.frames,
                                        modeled_transfer_s=c.modeled_transfer_s, measured_s=c.measured_s,
                                        dispatch_bytes=c.bytes_by_kind["ROUND_KIND_DISPATCH"],
                                        combine_bytes=c.bytes_by_kind["ROUND_KIND_COMBINE"])
                   for (_, src, dst), c in sorted(links.items())],
            rounds_completed=rounds, attached_dies=attached)
