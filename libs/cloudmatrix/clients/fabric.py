"""FabricClient: the UB fabric's counters and round state, and a die's link (Attach).

    async with FabricClient("127.0.0.1:50070") as fabric:
        stats = await fabric.stats()
        print(stats.rounds_completed, sum(link.bytes for link in stats.links))

``attach`` returns the blocking ``FabricLink`` the dies use: the model runs in a worker thread,
so a round's send and receive block there rather than on an event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses

from cloudmatrix.fabric.codec import round_id
from cloudmatrix.fabric.link import FabricLink
from cloudmatrix.rpc.client import ServiceClient
from cmx.fabric.v1 import fabric_pb2, fabric_pb2_grpc


@dataclasses.dataclass(frozen=True)
class LinkStats:
    src_die: int
    dst_die: int
    bytes: int
    frames: int
    modeled_transfer_s: float
    measured_s: float
    dispatch_bytes: int
    combine_bytes: int


@dataclasses.dataclass(frozen=True)
class FabricStats:
    links: list[LinkStats]
    rounds_completed: int
    attached_dies: int


class FabricClient(ServiceClient):
    SERVICE = "cmx.fabric.v1.UbFabric"
    STUB = fabric_pb2_grpc.UbFabricStub

    async def stats(self, reset: bool = False, deadline_s: float | None = None) -> FabricStats:
        """Per-link traffic since the last reset (``reset`` zeroes the counters after reading)."""
        r = await self.unary("Stats", fabric_pb2.StatsRequest(reset=reset), idempotent=not reset,
                             deadline_s=deadline_s)
        links = [LinkStats(s.src_die, s.dst_die, s.bytes, s.frames, s.modeled_transfer_s, s.measured_s,
                           s.dispatch_bytes, s.combine_bytes) for s in r.links]
        return FabricStats(links, r.rounds_completed, r.attached_dies)

    async def waiting(self, group: str, step: int, layer: int, kind: str = "dispatch", microbatch: int = 0,
                      deadline_s: float | None = None) -> list[int] | None:
        """The dies of ``group`` that have not sent their bundle of a round, or None when the
        fabric holds nothing of that round."""
        request = fabric_pb2.WaitingRequest(group=group, round=round_id(step, layer, microbatch, kind))
        reply = await self.unary("Waiting", request, idempotent=True, deadline_s=deadline_s)
        return list(reply.missing_dies) if reply.gathering else None

    async def attach(self, die_id: int, num_dies: int, group: str, *, round_timeout_s: float = 30.0,
                     connect_timeout_s: float = 30.0) -> FabricLink:
        """A die's link, once every die of ``group`` has attached (close it with ``link.close()``)."""
        link = FabricLink(self.address, die_id, num_dies, group, round_timeout_s, self.options.max_message_bytes)
        await asyncio.to_thread(link.connect, connect_timeout_s)
        return link
