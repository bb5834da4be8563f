"""gRPC servicer of the UB fabric: one bidirectional Attach stream per die.

A die sends one Bundle frame per round; the fabric reads its headers on the wire (round, peer
ids: ``cloudmatrix.fabric.wire``) and moves the payload bytes unread into the bundle each
destination receives once the round is complete. Attach therefore carries raw bytes (registered
by ``add_to_server``); Hello and Detached frames are ordinary ``fabric_pb2.Frame`` messages.
Telemetry is per round: one span per completed all-to-all round (in the trace of the step that
sent it: the first bundle's traceparent); the per-link counters live in plain dicts in the core
and reach Prometheus through ``LinkCollector`` at scrape time."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace
from prometheus_client.core import CounterMetricFamily

from cloudmatrix.errors import FieldError
from cloudmatrix.fabric.codec import round_key
from cloudmatrix.fabric.wire import read_bundle, write_bundle
from cloudmatrix.rpc.server import with_raw_bytes
from cloudmatrix.telemetry.context import context_from_traceparent
from cmx.common.v1 import common_pb2
from cmx.fabric.v1 import fabric_pb2, fabric_pb2_grpc
from services.ub_fabric.core import FabricCore

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer(__name__)

_KIND_NAMES = {value: name for name, value in common_pb2.RoundKind.items()}


class LinkCollector:
    """Prometheus counters per link, read from the core's running totals at scrape time (the
    routing path counts in plain dicts: no metric call per parcel)."""

    def __init__(self, core: FabricCore) -> None:
        self.core = core

    def collect(self):
        labels = ["src", "dst"]
        families = (CounterMetricFamily("cmx_fabric_bytes", "Payload bytes routed die to die", labels=labels),
                    CounterMetricFamily("cmx_fabric_frames", "Parcels routed die to die, empty ones included",
                                        labels=labels),
                    CounterMetricFamily("cmx_fabric_modeled_transfer_seconds", "Modeled UB transfer seconds",
                                        labels=labels))
        for (src, dst), c in sorted(self.core.totals.items()):
            for family, value in zip(families, (c.bytes, c.frames, c.modeled_transfer_s)):
                family.add_metric([str(src), str(dst)], value)
        yield from families


add_to_server = with_raw_bytes(fabric_pb2_grpc.add_UbFabricServicer_to_server, requests=["Attach"],
                               responses=["Attach"])


@dataclasses.dataclass
class _RoundSpan:
    """A traced round being gathered: its first bundle's trace context and time, parcels, bytes."""

    traceparent: str
    started_ns: int
    frames: int = 0
    bytes: int = 0


@dataclasses.dataclass(frozen=True)
class _Deposited:
    """A parcel waiting in the fabric for its round to complete."""

    payload: memoryview  # into the frame its sender's bundle arrived in
    at: float            # perf_counter when that bundle arrived


class UbFabricServicer(fabric_pb2_grpc.UbFabricServicer):
    def __init__(self, core: FabricCore, hello_timeout_s: float) -> None:
        self.core = core
        self.hello_timeout_s = hello_timeout_s
        self._rounds: dict[tuple[str, tuple], _RoundSpan] = {}  # traced rounds in flight
        self._contexts: dict[str, object] = {}  # traceparent -> its parsed context: a step's rounds share one

    async def Attach(self, request_iterator, context):
        hello = await self._read_hello(request_iterator, context)
        group, die = hello.group, hello.die_id
        try:
            queue, to_greet = self.core.attach(group, die, hello.world_size)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("die attached", extra={"group": group, "die": die, "world_size": hello.world_size})
        for member in to_greet:
            greeting = fabric_pb2.Frame(src_die=member.die_id, dst_die=member.die_id, hello=hello)
            member.queue.put_nowait((greeting.SerializeToString(), None))
        reader = asyncio.create_task(self._pump(request_iterator, group, die, queue))
        try:
            async for frame in self._outbound(queue, group, die):
                yield frame
        finally:
            reader.cancel()
            self._detach(group, die, queue, "stream closed")

    async def _read_hello(self, request_iterator, context) -> fabric_pb2.Hello:
        try:
            first = fabric_pb2.Frame.FromString(await asyncio.wait_for(anext(request_iterator), self.hello_timeout_s))
        except (StopAsyncIteration, asyncio.TimeoutError, DecodeError):
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
            frame, arrivals = item
            now = time.perf_counter()
            for src, at in (arrivals or {}).items():
                self.core.record_delivery(group, src, die, now - at)
            yield frame

    async def _pump(self, request_iterator, group: str, die: int, own: asyncio.Queue) -> None:
        """Route every bundle this die sends until it hangs up or sends a bad frame; then end the
        die's outbound stream too."""
        try:
            await self._route_all(request_iterator, group, die)
        finally:
            own.put_nowait(None)

    async def _route_all(self, request_iterator, group: str, die: int) -> None:
        async for frame in request_iterator:
            try:
                self._route(frame, group, die)
            except ValueError as exc:
                log.warning("bad frame dropped; detaching the die", extra={"die": die, "error": str(exc)})
                return

    def _route(self, raw: bytes, group: str, die: int) -> None:
        bundle = read_bundle(raw)
        if bundle is None:
            raise FieldError("frame", f"from die {die}: after the Hello every frame must be a Bundle")
        at = time.perf_counter()
        parcels = {peer: (_Deposited(payload, at), len(payload)) for peer, payload in bundle.parcels}
        if len(parcels) != len(bundle.parcels):
            raise FieldError("bundle", f"die {die} sent two parcels to the same peer")
        kind = _KIND_NAMES.get(bundle.round.kind, "ROUND_KIND_UNSPECIFIED")
        deliveries = self.core.deposit(group, die, round_key(bundle.round), parcels, kind)
        if bundle.traceparent:
            nbytes = sum(n for _, n in parcels.values())
            self._trace_round(bundle.traceparent, bundle.round, group, len(parcels), nbytes)
        for member, by_src in deliveries:
            out = write_bundle(bundle.round_bytes, "", [(src, [d.payload]) for src, d in sorted(by_src.items())],
                               src=member.die_id, dst=member.die_id)
            member.queue.put_nowait((out, {src: d.at for src, d in by_src.items()}))

    def _trace_round(self, traceparent: str, r: common_pb2.RoundId, group: str, parcels: int, size: int) -> None:
        """Count a traced bundle into its round; the round's last bundle ends one span for it all."""
        key = (group, round_key(r))
        span = self._rounds.get(key)
        if span is None:
            span = self._rounds[key] = _RoundSpan(traceparent, time.time_ns())
        span.frames, span.bytes = span.frames + parcels, span.bytes + size
        g = self.core.groups.get(group)
        if g is None or span.frames < g.world_size * (g.world_size - 1):
            return
        del self._rounds[key]
        kind = _KIND_NAMES.get(r.kind, "ROUND_KIND_UNSPECIFIED").removeprefix("ROUND_KIND_").lower()
        _TRACER.start_span(f"fabric.{kind}", context=self._context(span.traceparent),
                           start_time=span.started_ns,
                           attributes={"group": group, "step": r.step, "layer": r.layer, "microbatch": r.microbatch,
                                       "frames": span.frames, "bytes": span.bytes}).end()

    def _context(self, traceparent: str):
        """The parsed trace context of a traceparent, parsed once for the rounds of its step."""
        ctx = self._contexts.get(traceparent)
        if ctx is None:
            if len(self._contexts) >= 64:
                self._contexts.clear()
            ctx = self._contexts[traceparent] = context_from_traceparent(traceparent)
        return ctx

    def _detach(self, group: str, die: int, queue: asyncio.Queue, reason: str) -> None:
        remaining = self.core.detach(group, die, queue)
        for key in [k for k in self._rounds if k[0] == group]:  # rounds in flight can no longer complete
            del self._rounds[key]
        if not remaining:
            return
        log.info("die detached", extra={"group": group, "die": die, "reason": reason})
        notice = fabric_pb2.Detached(die_id=die, reason=reason)
        for member in remaining:
            frame = fabric_pb2.Frame(src_die=die, dst_die=member.die_id, detached=notice)
            member.queue.put_nowait((frame.SerializeToString(), None))

    async def Waiting(self, request, context):
        missing = self.core.missing(request.group, round_key(request.round))
        return fabric_pb2.WaitingReply(gathering=missing is not None, missing_dies=missing or [])

    async def Stats(self, request, context):
        links, rounds, attached = self.core.stats(reset=request.reset)
        return fabric_pb2.StatsReply(
            links=[fabric_pb2.LinkStats(src_die=src, dst_die=dst, bytes=c.bytes, frames=c.frames,
                                        modeled_transfer_s=c.modeled_transfer_s, measured_s=c.measured_s,
                                        dispatch_bytes=c.bytes_by_kind["ROUND_KIND_DISPATCH"],
                                        combine_bytes=c.bytes_by_kind["ROUND_KIND_COMBINE"])
                   for (_, src, dst), c in sorted(links.items())],
            rounds_completed=rounds, attached_dies=attached)
