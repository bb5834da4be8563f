"""The kvcache shard's disk tier without gRPC: spills and promotions, restarts over the same
directory, write-through, damaged files, LRU deletion, leases and deletes across both tiers, and
fsync durability."""
from __future__ import annotations

import zlib

import pytest
import torch

from services.kvcache.config import KvCacheConfig
from services.kvcache.disk import DiskTier
from services.kvcache.store import ShardStore
from tests.test_kvcache_store import BLOCK_BYTES, FULL, NS, FakeClock, fill, in_memory, key, make_store


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def clock():
    return FakeClock()


def test_eviction_spills_to_disk_and_get_promotes(gen, tmp_path):
    store = make_store(blocks=2, disk_dir=tmp_path)
    datas = fill(store, gen, [0, 1, 2])  # 0 spills
    assert (tmp_path / f"{key(0).hex()}.blk").is_file()
    s = store.stats()
    assert (s.spills, s.disk_blocks, s.disk_bytes, s.blocks) == (1, 1, BLOCK_BYTES, 2)
    assert store.lookup([key(0), key(1), key(2)]).longest_prefix == 3
    [got] = store.get([key(0)])  # promoted; 1 is evicted and spills
    assert got.data == datas[0] and got.checksum == zlib.crc32(datas[0])
    assert in_memory(store) == [key(2), key(0)]
    s = store.stats()
    assert (s.promotions, s.spills, s.evictions, s.disk_blocks, s.hits) == (1, 2, 2, 2, 1)
    store.get([key(1)])  # promoted again; 2 spills; 0's file was kept, so evicting it writes nothing
    store.get([key(2)])
    assert store.stats().spills == 3 and store.stats().disk_blocks == 3


def test_a_new_store_over_the_same_directory_sees_every_spilled_block(gen, tmp_path):
    store = make_store(blocks=2, disk_dir=tmp_path)
    datas = fill(store, gen, range(5))  # 0, 1, 2 spilled; 3, 4 only in memory
    restarted = make_store(blocks=2, disk_dir=tmp_path)
    assert restarted.stats().disk_blocks == 3
    assert restarted.lookup([key(i) for i in range(5)]).present == [True, True, True, False, False]
    got = restarted.get([key(0), key(1), key(2)])
    assert [b.data for b in got] == [datas[0], datas[1], datas[2]]
    assert all((b.namespace, b.kind, b.num_tokens) == (NS, FULL, 4) for b in got)


def test_write_through_puts_every_stored_block_on_disk_before_acking(gen, tmp_path):
    store = make_store(blocks=2, disk_dir=tmp_path, write_through=True)
    datas = fill(store, gen, range(5))
    assert len(list(tmp_path.glob("*.blk"))) == 5
    s = store.stats()
    assert (s.disk_blocks, s.evictions, s.spills, s.blocks) == (5, 3, 0, 2)  # evicting wrote nothing
    restarted = make_store(blocks=2, disk_dir=tmp_path)  # as after a SIGKILL: memory is gone
    assert [b.data for b in restarted.get([key(i) for i in range(5)])] == [datas[i] for i in range(5)]


@pytest.mark.parametrize("offset", [-1, 14, 30, 45])  # last data byte; header: checksum, key, namespace
def test_a_flipped_byte_in_a_block_file_is_a_miss(gen, tmp_path, offset):
    store = make_store(blocks=1, disk_dir=tmp_path)
    fill(store, gen, [0, 1])  # 0 spills
    path = tmp_path / f"{key(0).hex()}.blk"
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    assert store.get([key(0)]) == [None]
    s = store.stats()
    assert (s.checksum_failures, s.misses, s.disk_blocks) == (1, 1, 0)
    assert not path.exists()


def test_damaged_and_partial_files_are_dropped_when_the_tier_opens(gen, tmp_path):
    store = make_store(blocks=1, disk_dir=tmp_path)
    fill(store, gen, [0, 1, 2])  # 0 and 1 spill
    path = tmp_path / f"{key(0).hex()}.blk"
    path.write_bytes(path.read_bytes()[:-7])                 # torn
    (tmp_path / f"{key(5).hex()}.tmp").write_bytes(b"half")  # a write cut short by a crash
    restarted = make_store(blocks=1, disk_dir=tmp_path)
    s = restarted.stats()
    assert (s.disk_blocks, s.checksum_failures) == (1, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key(1).hex()}.blk"]


def test_the_disk_tier_deletes_its_least_recently_used_files(gen, tmp_path):
    store = make_store(blocks=1, disk_dir=tmp_path, disk_blocks=2)
    fill(store, gen, range(4))  # spills 0, 1, 2: 0's file goes
    assert store.lookup([key(i) for i in range(4)]).present == [False, True, True, True]
    store.lookup([key(1)])      # touches 1 on disk
    fill(store, gen, [4])       # spills 3: 2's file goes
    assert sorted(store.disk.index) == sorted([key(1), key(3)])
    assert len(list(tmp_path.glob("*.blk"))) == 2


def test_lease_promotes_a_disk_only_block_and_pins_it(gen, tmp_path, clock):
    store = make_store(blocks=2, clock=clock, disk_dir=tmp_path)
    datas = fill(store, gen, [0, 1, 2])  # 0 spills
    grant = store.lease([key(0), key(9)], ttl_s=5)
    assert grant.leased == [True, False]
    assert key(0) in store.memory.blocks and store.stats().promotions == 1
    fill(store, gen, [3, 4])
    assert key(0) in store.memory.blocks
    assert store.get([key(0)])[0].data == datas[0]


def test_delete_removes_both_tiers_and_refuses_leased_blocks(gen, tmp_path):
    store = make_store(blocks=2, disk_dir=tmp_path)
    fill(store, gen, [0, 1, 2])  # 0 spills
    store.lease([key(1)], ttl_s=10)
    assert store.delete([key(0), key(1), key(2), key(9)]) == (2, 1, 1)
    assert in_memory(store) == [key(1)]
    assert store.lookup([key(0), key(2)]).present == [False, False]
    assert not list(tmp_path.glob("*.blk"))


@pytest.mark.parametrize("fsync", [False, True])
def test_disk_fsync_syncs_each_file_and_its_directory(gen, tmp_path, monkeypatch, fsync):
    """With disk_fsync a written block's file and the directory entry of its rename are synced
    before the write returns (power-loss durability); without it nothing is synced."""
    synced = []
    real_fsync = __import__("os").fsync
    monkeypatch.setattr("services.kvcache.disk.os.fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store = ShardStore(4 * BLOCK_BYTES, 4 * BLOCK_BYTES, disk=DiskTier(tmp_path, 8 * BLOCK_BYTES, fsync),
                       write_through=True, clock=FakeClock())
    datas = fill(store, gen, [1, 2])
    assert len(synced) == (4 if fsync else 0)  # two blocks x (file + directory)
    reopened = DiskTier(tmp_path, 8 * BLOCK_BYTES, fsync)
    assert [reopened.read(key(i)).data for i in (1, 2)] == [datas[1], datas[2]]
    assert KvCacheConfig(disk_fsync=True).disk_fsync and not KvCacheConfig().disk_fsync
