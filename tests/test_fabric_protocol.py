"""The fabric's Attach protocol against a real ub_fabric process, spoken with plain generated
stubs: a round is gathered and delivered as one bundle per die, a bad frame detaches only its
sender, and Waiting names the dies a round still waits for."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from cloudmatrix.fabric.codec import round_id
from cmx.fabric.v1 import fabric_pb2, fabric_pb2_grpc
from tests.services import running_services

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fabric(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("fabric"), [("fabric", "ub_fabric", ())]) as records:
        yield records["fabric"].address


class Die:
    """One attached die: frames go out through a queue, frames come back from the stream."""

    def __init__(self, stub, die: int, world: int, group: str) -> None:
        self.outbox: asyncio.Queue = asyncio.Queue()
        hello = fabric_pb2.Hello(die_id=die, world_size=world, group=group)
        self.outbox.put_nowait(fabric_pb2.Frame(src_die=die, hello=hello))
        self.call = stub.Attach(self._frames())

    async def _frames(self):
        while (frame := await self.outbox.get()) is not None:
            yield frame

    async def receive(self) -> fabric_pb2.Frame:
        return await asyncio.wait_for(self.call.read(), 10)

    def send_bundle(self, rid, payloads: dict[int, bytes]) -> None:
        parcels = [fabric_pb2.Parcel(peer_die=p, payload=b) for p, b in payloads.items()]
        self.outbox.put_nowait(fabric_pb2.Frame(round=rid, bundle=fabric_pb2.Bundle(parcels=parcels)))


async def _attach(stub, world: int, group: str) -> list[Die]:
    dies = [Die(stub, d, world, group) for d in range(world)]
    for die in dies:
        assert (await die.receive()).HasField("hello")
    return dies


def test_a_round_is_delivered_to_every_die_as_one_bundle(fabric):
    rng = random.Random(7)
    payloads = {(src, dst): rng.randbytes(rng.choice([0, 9, 5000])) for src in range(3) for dst in range(3)
                if src != dst}

    async def scenario():
        async with grpc.aio.insecure_channel(fabric) as channel:
            stub = fabric_pb2_grpc.UbFabricStub(channel)
            await stub.Stats(fabric_pb2.StatsRequest(reset=True), timeout=10)
            dies = await _attach(stub, 3, "round")
            rid = round_id(4, 2, 0, "dispatch")
            for src, die in enumerate(dies):
                die.send_bundle(rid, {dst: payloads[(src, dst)] for dst in range(3) if dst != src})
            frames = [await die.receive() for die in dies]
            stats = await stub.Stats(fabric_pb2.StatsRequest(), timeout=10)
            for die in dies:
                die.outbox.put_nowait(None)
            return frames, stats

    frames, stats = asyncio.run(scenario())
    for dst, frame in enumerate(frames):
        assert frame.WhichOneof("body") == "bundle" and frame.round == round_id(4, 2, 0, "dispatch")
        assert {p.peer_die: p.payload for p in frame.bundle.parcels} == \
            {src: payloads[(src, dst)] for src in range(3) if src != dst}
    assert stats.rounds_completed == 1
    links = {(link.src_die, link.dst_die): link for link in stats.links}
    assert {k: (v.bytes, v.frames, v.dispatch_bytes) for k, v in links.items()} == \
        {k: (len(b), 1, len(b)) for k, b in payloads.items()}


@pytest.mark.parametrize("bad", ["missing peer", "not a bundle", "duplicate peer"])
def test_a_bad_frame_detaches_only_its_sender(fabric, bad):
    async def scenario():
        async with grpc.aio.insecure_channel(fabric) as channel:
            stub = fabric_pb2_grpc.UbFabricStub(channel)
            dies = await _attach(stub, 3, f"bad-{bad}")
            rid = round_id(1, 0, 0, "combine")
            if bad == "missing peer":
                dies[0].send_bundle(rid, {1: b"x"})  # nothing for die 2
            elif bad == "not a bundle":
                dies[0].outbox.put_nowait(fabric_pb2.Frame(hello=fabric_pb2.Hello(die_id=0, world_size=3)))
            else:
                dies[0].outbox.put_nowait(fabric_pb2.Frame(bundle=fabric_pb2.Bundle(
                    parcels=[fabric_pb2.Parcel(peer_die=1), fabric_pb2.Parcel(peer_die=1)])))  # twice to die 1
            notices = [await die.receive() for die in dies[1:]]
            ended = await dies[0].receive()  # the sender's stream ends
            healthy = await _attach(stub, 2, f"after-{bad}")  # the fabric serves on
            for die in dies + healthy:
                die.outbox.put_nowait(None)
            return notices, ended

    notices, ended = asyncio.run(scenario())
    assert all(n.HasField("detached") and n.detached.die_id == 0 for n in notices)
    assert ended is grpc.aio.EOF


def test_waiting_names_the_dies_a_round_still_waits_for(fabric):
    async def scenario():
        async with grpc.aio.insecure_channel(fabric) as channel:
            stub = fabric_pb2_grpc.UbFabricStub(channel)
            dies = await _attach(stub, 3, "waiting")
            rid = round_id(9, 1, 1, "dispatch")
            before = await stub.Waiting(fabric_pb2.WaitingRequest(group="waiting", round=rid), timeout=10)
            dies[1].send_bundle(rid, {0: b"a", 2: b"b"})
            for _ in range(100):  # the bundle is routed asynchronously
                during = await stub.Waiting(fabric_pb2.WaitingRequest(group="waiting", round=rid), timeout=10)
                if during.gathering:
                    break
                await asyncio.sleep(0.05)
            for die in dies:
                die.outbox.put_nowait(None)
            return before, during

    before, during = asyncio.run(scenario())
    assert not before.gathering and list(before.missing_dies) == []
    assert during.gathering and list(during.missing_dies) == [0, 2]
