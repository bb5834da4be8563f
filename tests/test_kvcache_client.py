"""KvPoolClient against real kvcache shard processes: placement, quorum, fallback, probes, repair, blobs."""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import zlib

import grpc
import numpy as np
import pytest

from cloudmatrix.kvcache import Block, KvPoolClient
from cloudmatrix.kvcache.shard_client import KvShardClient
from cloudmatrix.rpc.channel import make_channel
from cloudmatrix.rpc.tensor_codec import encode_tensor
from cmx.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from tests.rpc_helpers import run
from tests.services import running_services

NS = "test-model|fp32|bs16"
FAST = {"deadline_s": 2.0, "retries": 2, "down_after": 2, "probe_interval_s": 0.2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_specs(names: list[str], ports: dict[str, int]) -> list[tuple[str, str, tuple[str, ...]]]:
    """Shards on fixed ports, so a restarted shard keeps its address (and its place on the ring)."""
    return [(name, "kvcache", (f"server.port={ports[name]}",)) for name in names]


@contextlib.contextmanager
def shard_cluster(run_dir, n: int):
    names = [f"kvcache-{i}" for i in range(n)]
    ports = {name: free_port() for name in names}
    with running_services(run_dir, shard_specs(names, ports)) as records:
        yield records, ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three shards shared by the tests that leave every shard running; their addresses."""
    with shard_cluster(tmp_path_factory.mktemp("kvpool"), 3) as (records, _):
        yield [records[f"kvcache-{i}"].address for i in range(3)]


def make_blocks(n: int, seed: int) -> list[Block]:
    """Blocks whose data is, as the shard requires, a serialized Tensor: latent KV [2, 16, C]."""
    rng = np.random.default_rng(seed)
    tensors = [rng.standard_normal((2, 16, int(rng.integers(8, 64))), dtype=np.float32) for _ in range(n)]
    return [Block(rng.bytes(16), NS, "full", 16, encode_tensor(t).SerializeToString()) for t in tensors]


async def shard_call(address: str, method: str, request):
    async with make_channel(address) as channel:
        return await getattr(kvcache_pb2_grpc.KvCacheShardStub(channel), method)(request, timeout=5)


async def present_on(address: str, keys: list[bytes]) -> list[bool]:
    return list((await shard_call(address, "Lookup", kvcache_pb2.LookupRequest(keys=keys))).present)


def test_put_lands_on_exactly_the_ring_replicas(cluster):
    async def main():
        blocks = make_blocks(30, seed=1)
        async with KvPoolClient(cluster, replication=2, **FAST) as pool:
            before = await pool.stats()
            results = await pool.put_blocks(blocks)
            after = await pool.stats()
            again = await pool.put_blocks(blocks)
            for block, result in zip(blocks, results):
                assert result.acknowledged and not result.errors
                assert result.stored_on == result.replicas == tuple(pool.replicas(block.key))
            assert all(r.acknowledged for r in again)
            for shard in cluster:
                keys = [b.key for b in blocks]
                expected = [shard in pool.replicas(k) for k in keys]
                assert await present_on(shard, keys) == expected
                assert after[shard].stored - before[shard].stored == sum(expected)
                assert 0 < sum(expected) < len(keys)

    run(main())


def test_conflicting_bytes_are_reported_not_acknowledged(cluster):
    async def main():
        [block] = make_blocks(1, seed=2)
        async with KvPoolClient(cluster, replication=2, **FAST) as pool:
            assert (await pool.put_blocks([block]))[0].acknowledged
            [result] = await pool.put_blocks([Block(block.key, NS, "full", 16, make_blocks(1, seed=20)[0].data)])
            assert not result.acknowledged and result.stored_on == ()
            assert set(result.errors) == set(result.replicas)
            assert all("CONFLICT" in e for e in result.errors.values())

    run(main())


def test_get_verifies_and_read_repair_restores_a_missing_replica(cluster):
    async def main():
        blocks = make_blocks(4, seed=3)
        async with KvPoolClient(cluster, replication=2, **FAST) as pool:
            await pool.put_blocks(blocks)
            victim = blocks[0]
            primary, secondary = pool.replicas(victim.key)
            deleted = await shard_call(primary, "Delete", kvcache_pb2.DeleteRequest(keys=[victim.key]))
            assert deleted.deleted == 1 and await present_on(primary, [victim.key]) == [False]
            fetched = await pool.get_blocks([b.key for b in blocks] + [b"\0" * 16])
            assert fetched[b"\0" * 16] is None
            for block in blocks:
                got = fetched[block.key]
                assert (got.data, got.kind, got.num_tokens, got.namespace) == (block.data, "full", 16, NS)
                assert got.checksum == zlib.crc32(block.data)
            assert fetched[victim.key].shard == secondary
            assert await pool.drain_repairs() == 1
            assert await present_on(primary, [victim.key]) == [True]
            assert (await pool.get_blocks([victim.key]))[victim.key].shard == primary

    run(main())


def test_lookup_longest_prefix_lease_and_delete(cluster):
    async def main():
        blocks = make_blocks(6, seed=4)
        keys = [b.key for b in blocks]
        async with KvPoolClient(cluster, replication=2, **FAST) as pool:
            assert await pool.lookup(keys) == 0
            await pool.put_blocks(blocks[:3] + blocks[4:5])  # a gap at 3
            assert await pool.lookup(keys) == 3
            assert await pool.presence(keys) == [True, True, True, False, True, False]
            lease = await pool.lease(keys[:2], ttl_s=30)
            assert lease.leased == (True, True) and lease.ttl_s > 0
            refused = await pool.delete(keys[:2])
            assert (refused.deleted, refused.refused_leased) == (0, 4)  # 2 keys x 2 replicas
            assert await pool.release(lease) == len(lease.lease_ids)
            done = await pool.delete(keys)
            assert (done.deleted, done.refused_leased, done.errors) == (8, 0, {})
            assert await pool.lookup(keys) == 0

    run(main())


def test_one_lookup_leases_the_prompt_puts_join_it_and_the_read_ends_it(cluster):
    """The prefill -> decode handoff in three calls per shard: Lookup with a lease, Put joining it,
    Get ending it; in between every block of the prompt is pinned on every replica."""
    async def main():
        blocks = make_blocks(6, seed=9)
        keys = [b.key for b in blocks]
        async with KvPoolClient(cluster, replication=2, **FAST) as pool:
            await pool.put_blocks(blocks[:2])  # a cached prefix of two blocks
            present, lease = await pool.lookup_and_lease(keys, ttl_s=30)
            assert present == [True, True, False, False, False, False]
            assert lease.leased == tuple(present) and set(lease.lease_ids) <= set(cluster) and lease.ttl_s > 0
            results = await pool.put_blocks(blocks[2:], lease)
            assert all(r.acknowledged and set(r.leased_on) == set(r.stored_on) for r in results)
            refused = await pool.delete(keys)
            assert (refused.deleted, refused.refused_leased) == (0, 12)  # 6 keys x 2 replicas, all pinned
            fetched = await pool.get_blocks(keys, release=lease)
            assert [fetched[k].data for k in keys] == [b.data for b in blocks]
            done = await pool.delete(keys)
            assert (done.deleted, done.refused_leased) == (12, 0)

    run(main())


def test_puts_of_one_turn_share_one_stream_per_shard_and_each_joins_its_own_lease(cluster, monkeypatch):
    """Three prompts' write-backs started together (as a prefill step's are): one Put stream per
    shard for all of them; each caller gets its own blocks' results, each block joins its own
    caller's lease."""
    streams: list[tuple[str, int]] = []
    put_wire = KvShardClient.put_wire

    async def counted(self, messages, deadline_s=None):
        streams.append((self.address, len(messages)))
        return await put_wire(self, messages, deadline_s)

    monkeypatch.setattr(KvShardClient, "put_wire", counted)

    async def main():
        groups = [make_blocks(4, seed=20 + i) for i in range(3)]
        async with KvPoolClient(cluster, replication=2, **FAST) as pool:
            leases = [(await pool.lookup_and_lease([b.key for b in g], ttl_s=30))[1] for g in groups]
            results = await asyncio.gather(*(pool.put_blocks(g, lease) for g, lease in zip(groups, leases)))
            for group, lease, rs in zip(groups, leases, results):
                assert [r.key for r in rs] == [b.key for b in group] and all(r.acknowledged for r in rs)
                assert all(set(r.leased_on) == set(r.stored_on) <= set(lease.lease_ids) for r in rs)
                fetched = await pool.get_blocks([b.key for b in group], release=lease)
                assert [fetched[b.key].data for b in group] == [b.data for b in group]
            assert await pool.put_blocks([]) == []
            refused = await pool.delete([b.key for g in groups for b in g])
            assert (refused.deleted, refused.refused_leased) == (24, 0)  # every lease ended with its read
        return streams

    streams = run(main())
    assert len(streams) == len({shard for shard, _ in streams}) and sum(n for _, n in streams) == 24  # 12 x R=2


def test_blob_round_trip(cluster, tmp_path):
    async def main():
        data = random.Random(5).randbytes(5 * 2**20 + 123)
        async with KvPoolClient(cluster, replication=2, **FAST) as pool:
            result = await pool.put_blob("model/tiny/shared", data, chunk_bytes=2**20)
            assert result.acknowledged and len(result.stored_on) == 2
            assert await pool.get_blob("model/tiny/shared") == data
            assert await pool.get_blob("model/none") is None
            assert await pool.get_blob_to_file("model/tiny/shared", tmp_path / "out.bin")
            assert (tmp_path / "out.bin").read_bytes() == data
            (tmp_path / "in.bin").write_bytes(data[:3 * 2**20])
            assert (await pool.put_blob_from_file("model/file", tmp_path / "in.bin", chunk_bytes=2**20)).acknowledged
            assert await pool.get_blob("model/file") == data[:3 * 2**20]
            assert (await pool.put_blob("model/empty", b"")).acknowledged
            assert await pool.get_blob("model/empty") == b""
            assert not await pool.get_blob_to_file("model/none", tmp_path / "none.bin")
            assert not (tmp_path / "none.bin").exists() and not (tmp_path / "none.bin.part").exists()

    run(main())


class CorruptingShard(kvcache_pb2_grpc.KvCacheShardServicer):
    """An in-process shard whose Get serves every key with a checksum that does not match."""

    async def Get(self, request, context):
        for key in request.keys:
            yield kvcache_pb2.GetReply(key=key, found=True, data=b"rotten", checksum=1, kind=1, num_tokens=16,
                                       namespace=NS)


def test_a_corrupt_copy_is_never_served_and_not_repaired(cluster):
    async def main():
        server = grpc.aio.server()
        kvcache_pb2_grpc.add_KvCacheShardServicer_to_server(CorruptingShard(), server)
        fake = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            async with KvPoolClient([fake, cluster[0]], replication=2, **FAST) as pool:
                block = next(b for b in make_blocks(50, seed=6) if pool.replicas(b.key)[0] == fake)
                await pool.put_blocks([block])  # lands on the real shard; the fake answers UNIMPLEMENTED
                got = (await pool.get_blocks([block.key]))[block.key]
                assert (got.data, got.shard) == (block.data, cluster[0])
                assert await pool.drain_repairs() == 0
        finally:
            await server.stop(None)

    run(main())


async def wait_until(predicate, timeout_s: float) -> None:
    async def poll():
        while not predicate():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


def test_dead_primary_fallback_quorum_and_probe_back(tmp_path):
    """SIGKILL one of two shards: reads fall back, W=2 puts are refused, W=1 puts land, and the
    shard is used (and read-repaired) again once a probe finds it SERVING after a restart."""
    with shard_cluster(tmp_path, 2) as (records, ports), contextlib.ExitStack() as restarted:
        a, b = records["kvcache-0"].address, records["kvcache-1"].address

        def kill_a():
            os.kill(records["kvcache-0"].pid, signal.SIGKILL)

        async def restart_a():  # same name and port: same address, same place on the ring
            await asyncio.to_thread(restarted.enter_context, running_services(tmp_path, shard_specs(["kvcache-0"], ports)))

        run(dead_shard_scenario(a, b, kill_a, restart_a), timeout_s=90)


async def dead_shard_scenario(a: str, b: str, kill_a, restart_a) -> None:
    async with KvPoolClient([a, b], replication=2, write_quorum=2, **FAST) as pool, \
               KvPoolClient([a, b], replication=2, write_quorum=1, **FAST) as w1:
        blocks = make_blocks(20, seed=7)
        assert all(r.acknowledged for r in await pool.put_blocks(blocks))
        kill_a()
        fetched = await pool.get_blocks([x.key for x in blocks])
        assert all(fetched[x.key].data == x.data and fetched[x.key].shard == b for x in blocks)
        assert a in pool.down_shards
        [refused] = await pool.put_blocks(make_blocks(1, seed=8))
        assert not refused.acknowledged and refused.stored_on == (b,) and "down" in refused.errors[a]
        [accepted] = await w1.put_blocks(make_blocks(1, seed=8))  # w1 finds a dead by itself
        assert accepted.acknowledged and accepted.stored_on == (b,) and a in accepted.errors
        await wait_until(lambda: pool.failed_probes(a) >= 2, 10)
        assert a in pool.down_shards  # its probes failed while it is dead: still down
        await restart_a()
        await wait_until(lambda: pool.is_up(a), 10)
        await used_again(pool, w1, blocks, a, b)


async def used_again(pool: KvPoolClient, w1: KvPoolClient, blocks: list[Block], a: str, b: str) -> None:
    # a came back empty; the anti-entropy passes of both clients (each runs one when it sees a
    # return) copy back every block it should hold: the 20, and the one only b stored while a was
    # down. Both may copy a block at once (the second Put is a DUPLICATE): at least 21 in all.
    await wait_until(lambda: w1.is_up(a), 10)
    assert await pool.drain_anti_entropy() + await w1.drain_anti_entropy() >= len(blocks) + 1
    assert await present_on(a, [x.key for x in blocks]) == [True] * len(blocks)
    [result] = await pool.put_blocks(make_blocks(1, seed=9))
    assert result.acknowledged and set(result.stored_on) == {a, b}
    fetched = await pool.get_blocks([x.key for x in blocks])  # each from its primary again, a included
    assert all(fetched[x.key].data == x.data and fetched[x.key].shard == pool.replicas(x.key)[0] for x in blocks)
    assert {fetched[x.key].shard for x in blocks} == {a, b}
    assert await pool.drain_repairs() == 0  # nothing left for read repair to do


class HangingShard(kvcache_pb2_grpc.KvCacheShardServicer):
    """An in-process shard that accepts every call and never answers."""

    async def Put(self, request_iterator, context):
        await asyncio.sleep(3600)

    async def Lookup(self, request, context):
        await asyncio.sleep(3600)


def test_a_hanging_shard_times_out_is_marked_down_and_nothing_hangs(cluster):
    async def main():
        server = grpc.aio.server()
        kvcache_pb2_grpc.add_KvCacheShardServicer_to_server(HangingShard(), server)
        hung = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            async with KvPoolClient([hung, cluster[1]], replication=2, write_quorum=2, deadline_s=0.3, retries=2,
                                    down_after=2, probe_interval_s=0.2) as pool:
                blocks = make_blocks(3, seed=10)
                results = await asyncio.wait_for(pool.put_blocks(blocks), 3)
                assert all(not r.acknowledged and r.stored_on == (cluster[1],) for r in results)
                assert all("DEADLINE_EXCEEDED" in r.errors[hung] for r in results)
                assert hung in pool.down_shards  # two timed-out attempts; the third is not made
                assert await pool.lookup([b.key for b in blocks]) == 3  # answered by the live replica alone
                await wait_until(lambda: pool.failed_probes(hung) >= 2, 10)
                assert hung in pool.down_shards  # probed: its health service is not even registered
        finally:
            await server.stop(None)

    run(main())


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="16 bytes"):
        Block(b"short", NS, "full", 16, b"")
    with pytest.raises(ValueError, match="kind"):
        Block(b"k" * 16, NS, "partial", 16, b"")
    with pytest.raises(ValueError, match="write_quorum"):
        KvPoolClient(["a:1", "b:1"], replication=2, write_quorum=3)
    with pytest.raises(ValueError, match="replication"):
        KvPoolClient(["a:1"], replication=2)
    assert Block(b"k" * 16, NS, 2, 5, b"x").kind == "tail"  # the proto enum is accepted


@pytest.mark.parametrize("size", [1, 127, 128, 70000])
def test_a_block_written_on_the_wire_parses_as_its_put_message(size):
    rng = random.Random(size)
    block = Block(rng.randbytes(16), "tiny|float32|fp32|bs16", rng.choice(["full", "tail"]), rng.randrange(1, 17),
                  rng.randbytes(size))
    assert kvcache_pb2.PutBlock.FromString(block.to_wire()) == block.to_proto()


@pytest.mark.parametrize("found", [True, False])
def test_get_replies_read_on_the_wire_equal_the_protobuf_parse(found):
    from cloudmatrix.kvcache.reads import WireReply
    from cloudmatrix.rpc.protowire import WireError

    rng = random.Random(int(found))
    data = rng.randbytes(70000) if found else b""
    reply = kvcache_pb2.GetReply(key=rng.randbytes(16), found=found, data=data)
    if found:
        reply.checksum, reply.kind, reply.num_tokens, reply.namespace = zlib.crc32(data), 1, 7, "ns|x"
    raw = reply.SerializeToString()
    wire = WireReply.parse(raw)
    assert all(getattr(wire, f.name) == getattr(reply, f.name) for f in kvcache_pb2.GetReply.DESCRIPTOR.fields)
    with pytest.raises(WireError):
        WireReply.parse(raw[:-3] if found else raw + b"\x1a\x05ab")  # truncated data / a length past the end
