"""The kvcache shard's core without gRPC: LRU order, leases, immutability, checksums, and blobs.
The disk tier: test_kvcache_disk.py."""
from __future__ import annotations

import hashlib
import threading
import zlib

import pytest
import torch

from cloudmatrix.rpc.tensor_codec import encode_tensor
from cmx.common.v1 import common_pb2
from services.kvcache.blobs import BlobChunk, BlobNotFound, BlobStore
from services.kvcache.blocks import PutOutcome
from services.kvcache.config import KvCacheConfig
from services.kvcache.disk import DiskTier
from services.kvcache.store import ShardStore

FULL, TAIL = common_pb2.BLOCK_KIND_FULL, common_pb2.BLOCK_KIND_TAIL
NS = "tiny/bf16"
SHAPE = (2, 4, 8)  # layers, tokens, latent dim


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(i: int) -> bytes:
    return hashlib.blake2b(f"block-{i}".encode(), digest_size=16).digest()


def block_data(gen: torch.Generator, shape=SHAPE) -> bytes:
    return encode_tensor(torch.randn(*shape, generator=gen)).SerializeToString()


BLOCK_BYTES = len(block_data(torch.Generator().manual_seed(0)))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def clock():
    return FakeClock()


def make_store(blocks: int, clock=None, disk_dir=None, disk_blocks: int = 100, write_through: bool = False,
               **kwargs) -> ShardStore:
    """A store holding exactly ``blocks`` test blocks in memory; write-back unless asked."""
    disk = DiskTier(disk_dir, disk_blocks * BLOCK_BYTES) if disk_dir is not None else None
    return ShardStore(blocks * BLOCK_BYTES, 4 * BLOCK_BYTES, disk=disk, write_through=write_through,
                      clock=clock or FakeClock(), **kwargs)


def put(store: ShardStore, i: int, data: bytes, kind=FULL, num_tokens=4) -> PutOutcome:
    return store.put(key(i), NS, kind, num_tokens, data, zlib.crc32(data))


def leased_put(store: ShardStore, i: int, data: bytes, lease_id: str) -> tuple[PutOutcome, bool]:
    return store.put_leased(key(i), NS, FULL, 4, data, zlib.crc32(data), lease_id)


def fill(store: ShardStore, gen, ids) -> dict[int, bytes]:
    datas = {i: block_data(gen) for i in ids}
    for i, data in datas.items():
        assert put(store, i, data) is PutOutcome.STORED
    return datas


def in_memory(store: ShardStore) -> list[bytes]:
    return list(store.memory.blocks)


def test_lru_evicts_exactly_the_least_recently_used_blocks(gen):
    store = make_store(blocks=4)
    datas = fill(store, gen, range(4))
    store.get([key(0)])          # a Get hit is use
    store.lookup([key(1)])       # so is a Lookup hit
    fill(store, gen, [4, 5])     # evicts 2, then 3
    assert in_memory(store) == [key(0), key(1), key(4), key(5)]
    assert put(store, 0, datas[0]) is PutOutcome.DUPLICATE  # a duplicate Put is use too
    fill(store, gen, [6])        # evicts 1
    assert in_memory(store) == [key(4), key(5), key(0), key(6)]
    assert store.get([key(1), key(2), key(3)]) == [None, None, None]  # no disk tier: gone
    s = store.stats()
    assert (s.evictions, s.blocks, s.used_bytes, s.spills) == (3, 4, 4 * BLOCK_BYTES, 0)
    assert (s.hits, s.misses, s.stored, s.duplicates) == (1, 3, 7, 1)


def test_leased_blocks_are_never_evicted_and_full_of_leases_is_capacity(gen, clock):
    store = make_store(blocks=2, clock=clock)
    fill(store, gen, [0, 1])
    assert store.lease([key(0)], ttl_s=30).leased == [True]
    fill(store, gen, [2])        # 0 is the LRU block but leased: 1 goes
    assert in_memory(store) == [key(0), key(2)]
    store.lease([key(2)], ttl_s=30)
    assert put(store, 3, block_data(gen)) is PutOutcome.CAPACITY
    assert in_memory(store) == [key(0), key(2)]
    s = store.stats()
    assert (s.rejected, s.leased_blocks, s.evictions) == (1, 2, 1)
    oversized = block_data(gen, (3, 4, 8))  # larger than the whole tier's free room
    assert put(store, 4, oversized) is PutOutcome.CAPACITY


def test_leases_expire_by_the_clock_and_ttl_is_capped(gen, clock):
    store = make_store(blocks=1, clock=clock, max_lease_s=60.0)
    fill(store, gen, [0])
    grant = store.lease([key(0), key(9)], ttl_s=10.0)
    assert grant.leased == [True, False] and grant.ttl_s == 10.0 and grant.lease_id
    data = block_data(gen)
    assert put(store, 1, data) is PutOutcome.CAPACITY
    clock.now += 9.999
    assert put(store, 1, data) is PutOutcome.CAPACITY
    clock.now += 0.001
    assert put(store, 1, data) is PutOutcome.STORED
    assert in_memory(store) == [key(1)]
    assert store.lease([key(1)], ttl_s=1e6).ttl_s == 60.0
    assert store.lease([key(9)], ttl_s=5).lease_id == ""  # nothing present: no lease
    with pytest.raises(ValueError, match="ttl_s"):
        store.lease([key(1)], ttl_s=0)


def test_release_ends_a_lease_once(gen, clock):
    store = make_store(blocks=1, clock=clock)
    fill(store, gen, [0])
    first = store.lease([key(0)], ttl_s=10).lease_id
    second = store.lease([key(0)], ttl_s=20).lease_id
    assert store.release([first, "no-such-lease"]) == 1
    assert store.release([first]) == 0
    assert store.stats().leased_blocks == 1  # the second lease still pins it
    clock.now += 20
    assert store.release([second]) == 0  # expired leases are not counted
    assert store.stats().leased_blocks == 0
    fill(store, gen, [1])
    assert in_memory(store) == [key(1)]


def test_lookup_and_lease_pins_what_is_present_and_puts_join_it(gen, clock):
    """A prefill's survey: the present keys leased in the same step, a lease even over none, and
    the blocks written afterwards (stored, duplicate or conflicting) pinned by joining it."""
    store = make_store(blocks=3, clock=clock, max_lease_s=60.0)
    datas = fill(store, gen, [0])
    found, grant = store.lookup_and_lease([key(0), key(1), key(2)], ttl_s=10.0)
    assert found == ([True, False, False], 1) and grant.leased == [True, False, False] and grant.ttl_s == 10.0
    empty = store.lookup_and_lease([key(7)], ttl_s=1e6)[1]
    assert empty.lease_id and empty.leased == [False] and empty.ttl_s == 60.0
    assert leased_put(store, 1, block_data(gen), grant.lease_id) == (PutOutcome.STORED, True)
    assert leased_put(store, 0, datas[0], grant.lease_id) == (PutOutcome.DUPLICATE, True)
    assert leased_put(store, 0, block_data(gen), grant.lease_id) == (PutOutcome.CONFLICT, True)  # the stored one
    assert leased_put(store, 2, block_data(gen), "no-such-lease") == (PutOutcome.STORED, False)
    assert store.stats().leased_blocks == 2
    fill(store, gen, [3])  # the tier is full: the one unleased block (2) goes, not 0 or 1
    assert sorted(in_memory(store)) == sorted([key(0), key(1), key(3)])
    assert store.get([key(0), key(1)], release=[grant.lease_id, "no-such-lease"])[0].data == datas[0]
    assert store.stats().leased_blocks == 0 and store.release([grant.lease_id]) == 0  # the Get ended it
    clock.now += 10
    assert leased_put(store, 4, block_data(gen), empty.lease_id)[1] is True
    clock.now += 60
    assert leased_put(store, 5, block_data(gen), empty.lease_id)[1] is False  # expired
    with pytest.raises(ValueError, match="lease_ttl_s"):
        store.lookup_and_lease([key(0)], ttl_s=float("nan"))


def test_duplicate_is_a_no_op_and_conflict_is_rejected(gen):
    store = make_store(blocks=4)
    data = fill(store, gen, [0])[0]
    assert put(store, 0, data) is PutOutcome.DUPLICATE
    assert put(store, 0, block_data(gen)) is PutOutcome.CONFLICT
    assert put(store, 0, data, kind=TAIL) is PutOutcome.CONFLICT
    assert put(store, 0, data, num_tokens=3) is PutOutcome.CONFLICT
    s = store.stats()
    assert (s.stored, s.duplicates, s.conflicts, s.rejected, s.blocks) == (1, 1, 3, 3, 1)
    [got] = store.get([key(0)])
    assert (got.data, got.kind, got.num_tokens, got.namespace) == (data, FULL, 4, NS)


def _truncated_tensor(data: bytes) -> bytes:
    tensor = common_pb2.Tensor.FromString(data)
    tensor.data = tensor.data[:-4]
    return tensor.SerializeToString()


@pytest.mark.parametrize("change,needle", [
    ({"checksum": lambda d: zlib.crc32(d) ^ 1}, "checksum"),
    ({"key": key(0)[:15]}, "key: must be exactly 16 bytes, got 15"),
    ({"data": lambda gen: block_data(gen, (12, 4, 8))}, "over max_block_bytes"),
    ({"data": lambda gen: _truncated_tensor(block_data(gen))}, "needs 256 bytes, got 252"),
    ({"data": lambda gen: torch.randint(0, 256, (64,), generator=gen, dtype=torch.uint8).numpy().tobytes()},
     "data"),
    ({"kind": common_pb2.BLOCK_KIND_UNSPECIFIED}, "kind"),
    ({"num_tokens": 0}, "num_tokens"),
])
def test_invalid_put_raises_naming_the_field(gen, change, needle):
    store = make_store(blocks=8)
    data = change["data"](gen) if "data" in change else block_data(gen)
    checksum = change["checksum"](data) if "checksum" in change else zlib.crc32(data)
    with pytest.raises(ValueError) as err:
        store.put(change.get("key", key(0)), NS, change.get("kind", FULL), change.get("num_tokens", 4),
                  data, checksum)
    assert needle in str(err.value)
    s = store.stats()
    assert (s.rejected, s.stored, s.blocks) == (1, 0, 0)


def test_a_corrupt_memory_copy_is_dropped_and_never_served(gen):
    store = make_store(blocks=4)
    data = fill(store, gen, [0, 1])[0]
    original = store.memory.blocks[key(0)]
    flipped = bytes([data[-1] ^ 0x10])
    store.memory.blocks[key(0)] = type(original)(**{**original.__dict__, "data": data[:-1] + flipped})
    assert store.get([key(0), key(1)])[0] is None
    s = store.stats()
    assert (s.checksum_failures, s.misses, s.hits, s.blocks) == (1, 1, 1, 1)
    assert store.lookup([key(0)]).present == [False]


def test_lookup_reports_the_longest_present_prefix(gen):
    store = make_store(blocks=4)
    fill(store, gen, [0, 1, 3])
    assert store.lookup([key(0), key(1), key(2), key(3)]) == ([True, True, False, True], 2)
    assert store.lookup([]) == ([], 0)
    with pytest.raises(ValueError, match=r"keys\[1\]"):
        store.lookup([key(0), b"short"])



def _chunks(name: str, data: bytes, size: int) -> list[BlobChunk]:
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    return [BlobChunk(name, i, p, zlib.crc32(p), last=i == len(pieces) - 1, total_bytes=len(data) if i == 0 else 0)
            for i, p in enumerate(pieces)]


def _read_blob(blobs: BlobStore, name: str, chunk_bytes: int) -> bytes:
    chunks = list(blobs.get_blob(name, chunk_bytes))
    assert [c.chunk_index for c in chunks] == list(range(len(chunks))) and chunks[-1].last
    assert all(zlib.crc32(c.data) == c.checksum for c in chunks)
    return b"".join(c.data for c in chunks)


@pytest.mark.parametrize("persist", [False, True])
def test_blobs_round_trip(gen, tmp_path, persist):
    blobs = BlobStore(tmp_path / "blobs" if persist else None)
    data = torch.randint(0, 256, (10_000,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    info = blobs.put_blob("layer-3.experts", _chunks("layer-3.experts", data, 3000))
    assert (info.bytes, info.chunks) == (10_000, 4)
    assert _read_blob(blobs, "layer-3.experts", 4096) == data
    assert len(list(blobs.get_blob("layer-3.experts", 4096))) == 3
    assert blobs.stats() == (1, 10_000, 0)
    blobs.put_blob("empty", _chunks("empty", b"", 10) or [BlobChunk("empty", 0, b"", 0, last=True)])
    assert _read_blob(blobs, "empty", 16) == b""


def test_blobs_survive_a_restart_and_a_damaged_one_is_not_found(gen, tmp_path):
    data = torch.randint(0, 256, (5000,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    BlobStore(tmp_path / "blobs").put_blob("w", _chunks("w", data, 1024))
    store = ShardStore.from_config(KvCacheConfig(disk_dir=str(tmp_path)))  # blobs default to <disk_dir>/blobs
    assert store.stats().blobs == 1 and _read_blob(store.blobs, "w", 999) == data
    [path] = (tmp_path / "blobs").glob("*.blob")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BlobNotFound):
        store.get_blob("w", 999)
    assert store.stats().checksum_failures == 1 and store.stats().blobs == 0 and not path.exists()


@pytest.mark.parametrize("mangle,needle", [
    (lambda cs: [cs[0], cs[2], cs[1]], "chunk 2: expected 1"),
    (lambda cs: cs[1:], "chunk 1: expected 0"),
    (lambda cs: cs[:-1], "incomplete"),
    (lambda cs: [cs[0], BlobChunk("b", 1, cs[1].data, cs[1].checksum ^ 1), cs[2]], "checksum"),
    (lambda cs: cs + [BlobChunk("b", 3, b"x", zlib.crc32(b"x"))], "already received"),
    (lambda cs: [BlobChunk("b", 0, cs[0].data, cs[0].checksum, total_bytes=7), *cs[1:]], "total_bytes"),
])
def test_a_bad_blob_stream_stores_nothing(gen, tmp_path, mangle, needle):
    blobs = BlobStore(tmp_path)
    data = torch.randint(0, 256, (300,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    with pytest.raises(ValueError) as err:
        blobs.put_blob("b", mangle(_chunks("b", data, 100)))
    assert needle in str(err.value)
    with pytest.raises(BlobNotFound):
        blobs.get_blob("b", 100)
    assert list(tmp_path.iterdir()) == []


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="capacity_bytes"):
        KvCacheConfig(capacity_bytes=0)
    with pytest.raises(ValueError, match="max_lease_s"):
        KvCacheConfig(max_lease_s=-1)
    with pytest.raises(ValueError, match="max_block_bytes"):
        KvCacheConfig(max_block_bytes=2**30)
    assert KvCacheConfig(disk_dir=str(tmp_path)).resolved_blob_dir == str(tmp_path / "blobs")
    assert KvCacheConfig().resolved_blob_dir is None


def test_concurrent_callers_keep_the_tiers_consistent(tmp_path):
    store = make_store(blocks=6, disk_dir=tmp_path, disk_blocks=10)
    datas = {i: block_data(torch.Generator().manual_seed(i)) for i in range(24)}

    def worker(offset: int) -> None:
        for step in range(60):
            i = (offset * 7 + step) % 24
            put(store, i, datas[i])
            [got] = store.get([key((i + 5) % 24)])
            assert got is None or got.data == datas[(i + 5) % 24]
            store.lease([key(i)], ttl_s=0.5)
            store.lookup([key(i), key((i + 1) % 24)])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert store.memory.used_bytes == sum(len(b.data) for b in store.memory.blocks.values()) <= 6 * BLOCK_BYTES
    assert store.disk.used_bytes == sum(m.size for m in store.disk.index.values()) <= 10 * BLOCK_BYTES
    assert sorted(p.stem for p in tmp_path.glob("*.blk")) == sorted(k.hex() for k in store.disk.index)
    s = store.stats()
    assert s.stored + s.duplicates + s.rejected == 4 * 60 and s.conflicts == 0 and s.checksum_failures == 0
