"""The kvcache shard process over gRPC: blocks, leases, stats, malformed Puts, blobs, metrics,
and the disk tier across a SIGKILL."""
from __future__ import annotations

import hashlib
import os
import signal
import zlib

import grpc
import pytest
import torch

from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.rpc.tensor_codec import encode_tensor
from cmx.common.v1 import common_pb2
from cmx.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from tests.rpc_helpers import fetch
from tests.services import running_service

NS = "tiny/fp32"
BLOCK_BYTES = len(encode_tensor(torch.zeros(2, 4, 8)).SerializeToString())


def key(i: int) -> bytes:
    return hashlib.blake2b(f"svc-{i}".encode(), digest_size=16).digest()


def block(i: int, gen: torch.Generator, shape=(2, 4, 8), **fields) -> kvcache_pb2.PutBlock:
    data = encode_tensor(torch.randn(*shape, generator=gen)).SerializeToString()
    msg = kvcache_pb2.PutBlock(key=key(i), namespace=NS, kind=common_pb2.BLOCK_KIND_FULL, num_tokens=4,
                               data=data, checksum=zlib.crc32(data))
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kvcache")
    overrides = (f"capacity_bytes={4 * BLOCK_BYTES}", f"max_block_bytes={4 * BLOCK_BYTES}",
                 f"disk_dir={run_dir / 'disk'}")
    with (running_service("kvcache", run_dir, *overrides) as record,
          grpc.insecure_channel(record.address) as channel):
        yield record, kvcache_pb2_grpc.KvCacheShardStub(channel)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


def test_put_get_lookup_lease_delete_and_stats(shard, gen):
    _, stub = shard
    blocks = [block(i, gen) for i in range(3)]
    reply = stub.Put(iter(blocks + [blocks[0]]), timeout=10)
    assert (reply.stored, reply.duplicates, reply.rejected) == (3, 1, 0)
    assert [s.status for s in reply.statuses] == [kvcache_pb2.PUT_STATUS_STORED] * 3 + [kvcache_pb2.PUT_STATUS_DUPLICATE]
    conflict = stub.Put(iter([block(1, gen)]), timeout=10).statuses[0]
    assert conflict.status == kvcache_pb2.PUT_STATUS_REJECTED_CONFLICT and "immutable" in conflict.message

    got = list(stub.Get(kvcache_pb2.GetRequest(keys=[key(1), key(99), key(0)]), timeout=10))
    assert [g.key for g in got] == [key(1), key(99), key(0)]
    assert [g.found for g in got] == [True, False, True]
    assert got[0].data == blocks[1].data and got[0].checksum == blocks[1].checksum
    assert (got[0].namespace, got[0].kind, got[0].num_tokens) == (NS, common_pb2.BLOCK_KIND_FULL, 4)

    lookup = stub.Lookup(kvcache_pb2.LookupRequest(keys=[key(0), key(1), key(99), key(2)]), timeout=10)
    assert (list(lookup.present), lookup.longest_prefix) == ([True, True, False, True], 2)

    lease = stub.Lease(kvcache_pb2.LeaseRequest(keys=[key(0), key(99)], ttl_s=1e9), timeout=10)
    assert list(lease.leased) == [True, False] and lease.ttl_s == 600.0 and lease.lease_id
    deleted = stub.Delete(kvcache_pb2.DeleteRequest(keys=[key(0), key(2), key(99)]), timeout=10)
    assert (deleted.deleted, deleted.missing, deleted.refused_leased) == (1, 1, 1)
    assert stub.Release(kvcache_pb2.ReleaseRequest(lease_ids=[lease.lease_id]), timeout=10).released == 1
    assert stub.Delete(kvcache_pb2.DeleteRequest(keys=[key(0), key(1)]), timeout=10).deleted == 2

    stats = stub.Stats(kvcache_pb2.StatsRequest(), timeout=10)
    assert (stats.stored, stats.duplicates, stats.conflicts, stats.hits, stats.misses) == (3, 1, 1, 2, 1)
    assert (stats.blocks, stats.used_bytes, stats.capacity_bytes) == (0, 0, 4 * BLOCK_BYTES)


def _truncated(msg: kvcache_pb2.PutBlock) -> kvcache_pb2.PutBlock:
    tensor = common_pb2.Tensor.FromString(msg.data)
    tensor.data = tensor.data[:-4]
    msg.data = tensor.SerializeToString()
    msg.checksum = zlib.crc32(msg.data)
    return msg


@pytest.mark.parametrize("make_bad,field,needle", [
    (lambda gen: _truncated(block(11, gen)), "data", "needs 256 bytes, got 252"),
    (lambda gen: block(11, gen, checksum=12345), "checksum", "does not match the CRC-32"),
    (lambda gen: block(11, gen, shape=(10, 4, 8)), "data", "over max_block_bytes"),
    (lambda gen: block(11, gen, key=key(11)[:15]), "key", "must be exactly 16 bytes, got 15"),
])
def test_a_malformed_block_is_invalid_argument_and_the_shard_keeps_serving(
    shard, gen, make_bad, field, needle
):
    record, stub = shard
    good = block(10, gen)
    with pytest.raises(grpc.RpcError) as err:
        stub.Put(iter([good, make_bad(gen)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details.startswith(f"blocks[1].{field}: ") and needle in details
    assert dict(err.value.trailing_metadata())["cmx-field"] == f"blocks[1].{field}"
    assert health_check_sync(record.address) == "SERVING"
    assert next(stub.Get(kvcache_pb2.GetRequest(keys=[key(10)]), timeout=10)).found  # earlier blocks stay
    assert stub.Put(iter([block(12, gen)]), timeout=10).stored == 1
    stub.Delete(kvcache_pb2.DeleteRequest(keys=[key(10), key(12)]), timeout=10)


def test_blobs_over_grpc(shard, gen):
    _, stub = shard
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GetBlob(kvcache_pb2.GetBlobRequest(name="no-such-blob"), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-blob" in err.value.details()

    data = torch.randint(0, 256, (3 * 2**20 // 2,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    pieces = [data[i:i + 700_000] for i in range(0, len(data), 700_000)]
    chunks = [kvcache_pb2.BlobChunk(name="weights/shard-0", chunk_index=i, data=p, checksum=zlib.crc32(p),
                                    last=i == len(pieces) - 1, total_bytes=len(data) if i == 0 else 0)
              for i, p in enumerate(pieces)]
    reply = stub.PutBlob(iter(chunks), timeout=10)
    assert (reply.name, reply.bytes, reply.chunks) == ("weights/shard-0", len(data), 3)
    back = list(stub.GetBlob(kvcache_pb2.GetBlobRequest(name="weights/shard-0"), timeout=10))
    assert b"".join(c.data for c in back) == data and back[-1].last and back[0].total_bytes == len(data)
    assert all(zlib.crc32(c.data) == c.checksum for c in back)

    with pytest.raises(grpc.RpcError) as err:
        stub.PutBlob(iter([chunks[0], chunks[2]]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("chunk_index: ") and "chunk 2: expected 1" in err.value.details()


def test_metrics_are_exported(shard, gen):
    record, stub = shard
    stub.Put(iter([block(20, gen)]), timeout=10)
    list(stub.Get(kvcache_pb2.GetRequest(keys=[key(20), key(21)]), timeout=10))
    _, text = fetch(f"http://127.0.0.1:{record.metrics_port}/metrics")
    for name in ("cmx_kvcache_hits_total", "cmx_kvcache_misses_total", "cmx_kvcache_stored_total",
                 "cmx_kvcache_evictions_total", "cmx_kvcache_checksum_failures_total",
                 'cmx_kvcache_used_bytes{tier="memory"}', 'cmx_kvcache_used_bytes{tier="disk"}',
                 "cmx_kvcache_leased_blocks", 'cmx_kvcache_keys{tier="memory"}'):
        assert name in text, name
    stub.Delete(kvcache_pb2.DeleteRequest(keys=[key(20)]), timeout=10)


@pytest.mark.parametrize("write_through", [False, True])
def test_the_disk_tier_survives_sigkill_and_restart(tmp_path, gen, write_through):
    overrides = (f"capacity_bytes={2 * BLOCK_BYTES}", f"disk_dir={tmp_path / 'disk'}",
                 f"disk_write_through={write_through}")
    blocks = [block(30 + i, gen) for i in range(5)]  # 3 are evicted; write-back spills just those
    on_disk = 5 if write_through else 3
    with running_service("kvcache", tmp_path, *overrides) as record:
        with grpc.insecure_channel(record.address) as channel:
            stub = kvcache_pb2_grpc.KvCacheShardStub(channel)
            assert stub.Put(iter(blocks), timeout=10).stored == 5
            stats = stub.Stats(kvcache_pb2.StatsRequest(), timeout=10)
            assert (stats.blocks, stats.disk_blocks, stats.evictions) == (2, on_disk, 3)
        os.kill(record.pid, signal.SIGKILL)
    with (running_service("kvcache", tmp_path, *overrides) as record,
          grpc.insecure_channel(record.address) as channel):
        stub = kvcache_pb2_grpc.KvCacheShardStub(channel)
        assert stub.Stats(kvcache_pb2.StatsRequest(), timeout=10).disk_blocks == on_disk
        got = list(stub.Get(kvcache_pb2.GetRequest(keys=[b.key for b in blocks]), timeout=10))
    assert [g.found for g in got] == [True] * on_disk + [False] * (5 - on_disk)  # the memory tier is lost
    assert [g.data for g in got[:on_disk]] == [b.data for b in blocks[:on_disk]]  # bit for bit
