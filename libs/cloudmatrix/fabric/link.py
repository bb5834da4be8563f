"""A die's link to the UB fabric: one bidirectional gRPC stream carrying every all-to-all round.

The model runs synchronously in a worker thread, so the link is synchronous too: a round is one
Bundle frame out (a parcel for every peer) through a queue feeding the request stream, and one
Bundle frame in (every peer's parcel for this die), which a receiver thread files by round.
Bundles are written and read on the wire directly (``wire.py``): tensor bytes are copied once
into the outgoing frame and once out of the incoming one. A peer that detaches (the fabric says
so) or stays silent past the round deadline fails the round with ``PeerUnavailable``; nothing
hangs.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time

import grpc
from google.protobuf.message import DecodeError

from cloudmatrix.fabric.codec import from_payload, round_id, round_key, to_payload
from cloudmatrix.fabric.wire import RawBundle, WireError, read_bundle, write_bundle
from cloudmatrix.moe.dispatch import TokenRows
from cloudmatrix.rpc.channel import channel_options, make_sync_channel
from cloudmatrix.rpc.errors import PeerUnavailable
from cloudmatrix.telemetry.context import current_traceparent
from cmx.fabric.v1 import fabric_pb2, fabric_pb2_grpc

_CLOSE = object()
ATTACH_METHOD = "/cmx.fabric.v1.UbFabric/Attach"


@dataclasses.dataclass
class RoundTraffic:
    """Bytes this die sent to / received from each peer in one round (for the cost model)."""

    kind: str
    layer: int
    sent: dict[int, int]
    received: dict[int, int]
    wait_s: float  # wall seconds this die waited for its peers' parcels


class FabricLink:
    def __init__(self, address: str, die_id: int, num_dies: int, group: str, round_timeout_s: float,
                 max_message_bytes: int) -> None:
        self.address, self.die_id, self.num_dies, self.group = address, die_id, num_dies, group
        self.round_timeout_s = round_timeout_s
        self._options = channel_options(max_message_bytes)
        self._cond = threading.Condition()
        self._inbox: dict[tuple, RawBundle] = {}  # round -> the bundle delivered to this die
        self._detached: dict[int, str] = {}
        self._broken: str | None = None
        self._greeted = False
        self._round = threading.local()  # two microbatches step concurrently, one thread each
        self._generation = 0  # one per Attach stream: a stream that ended cannot touch the next one's state
        self._reconnect_lock = threading.Lock()

    def connect(self, timeout_s: float, wait_for_fabric: bool = False) -> None:
        """Attach and wait until the whole group has attached (the fabric's Hello). With
        ``wait_for_fabric``, a fabric not listening yet is waited for too (a die loading while its
        pod's fabric container starts); without, that fails at once."""
        self._channel = make_sync_channel(self.address, self._options)
        self._outbox: queue.Queue = queue.Queue()
        hello = fabric_pb2.Hello(die_id=self.die_id, world_size=self.num_dies, group=self.group)
        self._outbox.put(fabric_pb2.Frame(src_die=self.die_id, hello=hello).SerializeToString())
        self._stub = fabric_pb2_grpc.UbFabricStub(self._channel)
        attach = self._channel.stream_stream(ATTACH_METHOD)  # raw bytes both ways: frames are read on the wire
        self._responses = attach(iter(self._outbox.get, _CLOSE), wait_for_ready=wait_for_fabric)
        threading.Thread(target=self._receive, args=(self._responses, self._generation),
                         name=f"fabric-link-{self.die_id}", daemon=True).start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._greeted or self._broken, timeout_s) or self._broken:
                why = self._broken or "peers missing"
                self._broken = f"could not attach: {why}"
                self.close()
                raise PeerUnavailable(f"fabric {self.address}: group {self.group!r} of {self.num_dies} dies did not "
                                      f"assemble within {timeout_s:.0f} s ({why})")

    def reconnect_if_broken(self, timeout_s: float) -> None:
        """Attach again when the stream broke (the fabric restarted, or was unreachable): every die
        of the group does so at its next step, and the group re-forms on the new stream. Raises
        ``PeerUnavailable`` (fast when the fabric is down) if it cannot."""
        with self._reconnect_lock:
            with self._cond:
                if self._broken is None:
                    return
                self._generation += 1
                self._inbox.clear()
                self._detached, self._broken, self._greeted = {}, None, False
            self.close()
            self.connect(timeout_s)

    @property
    def traffic(self) -> list[RoundTraffic]:
        """This thread's rounds since its last begin_step."""
        return getattr(self._round, "traffic", [])

    def begin_step(self, step: int, microbatch: int) -> None:
        """Rounds this thread runs next belong to (step, microbatch); leftovers of this
        microbatch's older steps are dropped."""
        self._round.step, self._round.microbatch, self._round.traffic = step, microbatch, []
        with self._cond:
            for key in [k for k in self._inbox if k[0] < step and k[2] == microbatch]:
                del self._inbox[key]

    def all_to_all(self, kind: str, layer: int, outgoing: dict[int, TokenRows]) -> dict[int, TokenRows]:
        rid = round_id(self._round.step, layer, self._round.microbatch, kind)
        payloads = {dst: to_payload(outgoing.get(dst)) for dst in range(self.num_dies) if dst != self.die_id}
        start = time.perf_counter()
        parcels = {}
        if payloads:  # a group of one has no peers: nothing crosses the fabric
            # the die's Forward span is current: the fabric's round span joins its trace
            self._outbox.put(write_bundle(rid.SerializeToString(), current_traceparent(), sorted(payloads.items())))
            parcels = dict(self._wait_round(rid, kind).parcels)
            if set(parcels) != set(payloads):
                raise PeerUnavailable(f"{kind} round step {rid.step} layer {layer}: the fabric delivered parcels "
                                      f"from dies {sorted(parcels)}, expected {sorted(payloads)}")
        waited = time.perf_counter() - start
        self._round.traffic.append(RoundTraffic(kind, layer, {d: sum(map(len, p)) for d, p in payloads.items()},
                                                {s: len(b) for s, b in parcels.items()}, waited))
        received = {src: from_payload(b, src) for src, b in parcels.items()}
        received[self.die_id] = outgoing.get(self.die_id)
        return {src: rows for src, rows in received.items() if rows is not None}

    def _wait_round(self, rid, kind: str) -> RawBundle:
        key, layer = round_key(rid), rid.layer
        with self._cond:
            self._cond.wait_for(lambda: key in self._inbox or self._detached or self._broken,
                                self.round_timeout_s)
            if key in self._inbox:  # delivered, even if a peer left or the stream ended right after
                return self._inbox.pop(key)
            if self._broken:
                raise PeerUnavailable(f"die {self.die_id}: fabric link broken: {self._broken}")
            if self._detached:
                dead = ", ".join(f"die {d} ({why})" for d, why in sorted(self._detached.items()))
                raise PeerUnavailable(f"{kind} round step {key[0]} layer {layer}: peer left the fabric: {dead}")
        raise PeerUnavailable(f"{kind} round step {key[0]} layer {layer}: {self._missing(rid)} "
                              f"within {self.round_timeout_s:.1f} s")

    def _missing(self, rid) -> str:
        """Ask the fabric which peers have not sent this round (cold path: a round timed out)."""
        try:
            reply = self._stub.Waiting(fabric_pb2.WaitingRequest(group=self.group, round=rid), timeout=2.0)
        except grpc.RpcError as err:
            return f"the round did not complete (the fabric did not say who is missing: {err.code().name})"
        if not reply.gathering:
            return "the fabric holds no bundle of this round"
        return f"no bundle from dies {list(reply.missing_dies)}"

    def _receive(self, responses, generation: int) -> None:
        try:
            for frame in responses:
                self._file(frame, generation)
            reason = "the fabric closed the stream"
        except grpc.RpcError as err:
            reason = f"{err.code().name}: {err.details()}"
        except (WireError, DecodeError) as err:
            reason = f"the fabric sent a malformed frame ({err})"
        with self._cond:
            if generation == self._generation:
                self._broken = reason
                self._cond.notify_all()

    def _file(self, raw: bytes, generation: int) -> None:
        bundle = read_bundle(raw)
        frame = fabric_pb2.Frame.FromString(raw) if bundle is None else None
        with self._cond:
            if generation != self._generation:
                return
            if bundle is not None:
                self._inbox[round_key(bundle.round)] = bundle
            elif frame.HasField("hello"):
                self._greeted, self._detached = True, {}
            elif frame.HasField("detached"):
                self._detached[frame.detached.die_id] = frame.detached.reason
            self._cond.notify_all()

    def close(self) -> None:
        self._outbox.put(_CLOSE)
        self._channel.close()
