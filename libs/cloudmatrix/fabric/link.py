"""A die's link to the UB fabric: one bidirectional gRPC stream carrying every all-to-all round.

The model runs synchronously in a worker thread, so the link is synchronous too: frames go out
through a queue feeding the request stream, a receiver thread files incoming frames by round, and
``all_to_all`` waits for one frame from every peer. A peer that detaches (the fabric says so) or
stays silent past the round deadline fails the round with ``PeerUnavailable``; nothing hangs.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time

import grpc

from cloudmatrix.fabric.codec import from_frame, round_id, round_key, to_frame
from cloudmatrix.moe.dispatch import TokenRows
from cloudmatrix.rpc.channel import channel_options
from cloudmatrix.rpc.errors import PeerUnavailable
from cloudmatrix.telemetry.context import current_traceparent
from cmx.fabric.v1 import fabric_pb2, fabric_pb2_grpc

_CLOSE = object()


@dataclasses.dataclass
class RoundTraffic:
    """Bytes this die sent to / received from each peer in one round (for the cost model)."""

    kind: str
    layer: int
    sent: dict[int, int]
    received: dict[int, int]
    wait_s: float  # wall seconds this die waited for its peers' frames


class FabricLink:
    def __init__(self, address: str, die_id: int, num_dies: int, group: str, round_timeout_s: float,
                 max_message_bytes: int) -> None:
        self.address, self.die_id, self.num_dies, self.group = address, die_id, num_dies, group
        self.round_timeout_s = round_timeout_s
        self._options = channel_options(max_message_bytes)
        self._cond = threading.Condition()
        self._inbox: dict[tuple, dict[int, fabric_pb2.Frame]] = {}
        self._detached: dict[int, str] = {}
        self._broken: str | None = None
        self._greeted = False
        self._round = threading.local()  # two microbatches step concurrently, one thread each

    def connect(self, timeout_s: float) -> None:
        """Attach and wait until the whole group has attached (the fabric's Hello)."""
        self._channel = grpc.insecure_channel(self.address, options=self._options)
        self._outbox: queue.Queue = queue.Queue()
        hello = fabric_pb2.Hello(die_id=self.die_id, world_size=self.num_dies, group=self.group)
        self._outbox.put(fabric_pb2.Frame(src_die=self.die_id, hello=hello))
        self._responses = fabric_pb2_grpc.UbFabricStub(self._channel).Attach(iter(self._outbox.get, _CLOSE))
        threading.Thread(target=self._receive, name=f"fabric-link-{self.die_id}", daemon=True).start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._greeted or self._broken, timeout_s) or self._broken:
                self.close()
                raise PeerUnavailable(f"fabric {self.address}: group {self.group!r} of {self.num_dies} dies did not "
                                      f"assemble within {timeout_s:.0f} s ({self._broken or 'peers missing'})")

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
        traceparent = current_traceparent()  # the die's Forward span: the fabric's spans join its trace
        sent = {}
        for dst in range(self.num_dies):
            if dst != self.die_id:
                frame = to_frame(self.die_id, dst, rid, outgoing.get(dst))
                frame.traceparent = traceparent
                sent[dst] = frame.ByteSize()
                self._outbox.put(frame)
        start = time.perf_counter()
        frames = self._wait_round(round_key(rid), kind, layer)
        waited = time.perf_counter() - start
        self._round.traffic.append(RoundTraffic(kind, layer, sent, {s: f.ByteSize() for s, f in frames.items()}, waited))
        received = {src: from_frame(f) for src, f in frames.items()}
        received[self.die_id] = outgoing.get(self.die_id)
        return {src: rows for src, rows in received.items() if rows is not None}

    def _wait_round(self, key: tuple, kind: str, layer: int) -> dict[int, fabric_pb2.Frame]:
        peers = self.num_dies - 1
        with self._cond:
            done = self._cond.wait_for(
                lambda: len(self._inbox.get(key, ())) == peers or self._detached or self._broken, self.round_timeout_s)
            if self._broken:
                raise PeerUnavailable(f"die {self.die_id}: fabric link broken: {self._broken}")
            if self._detached:
                dead = ", ".join(f"die {d} ({why})" for d, why in sorted(self._detached.items()))
                raise PeerUnavailable(f"{kind} round step {key[0]} layer {layer}: peer left the fabric: {dead}")
            if not done:
                missing = sorted(set(range(self.num_dies)) - {self.die_id} - set(self._inbox.get(key, {})))
                raise PeerUnavailable(f"{kind} round step {key[0]} layer {layer}: no frame from dies {missing} "
                                      f"within {self.round_timeout_s:.1f} s")
            return self._inbox.pop(key)

    def _receive(self) -> None:
        try:
            for frame in self._responses:
                self._file(frame)
            reason = "the fabric closed the stream"
        except grpc.RpcError as err:
            reason = f"{err.code().name}: {err.details()}"
        with self._cond:
            self._broken = reason
            self._cond.notify_all()

    def _file(self, frame: fabric_pb2.Frame) -> None:
        body = frame.WhichOneof("body")
        with self._cond:
            if body == "hello":
                self._greeted, self._detached = True, {}
            elif body == "detached":
                self._detached[frame.detached.die_id] = frame.detached.reason
            else:
                self._inbox.setdefault(round_key(frame.round), {})[frame.src_die] = frame
            self._cond.notify_all()

    def close(self) -> None:
        self._outbox.put(_CLOSE)
        self._channel.close()
