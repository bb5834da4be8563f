"""HashRing: deterministic placement (pinned golden values), distinct replicas, balance, minimal movement."""
from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys

import pytest

from cloudmatrix.kvcache.ring import HashRing, ring_point

SHARDS = [f"kvcache-{i}.kvcache:50051" for i in range(4)]
S0, S1, S2, S3 = SHARDS
# Computed once with blake2b placement (64 vnodes) and pinned: a change here moves every key in
# every deployed pool, so it must be deliberate.
GOLDEN_POINTS = {b"abc": 0xD8BB14D833D59559, b"": 0xE4A6A0577479B2B4,
                 b"kvcache-0.kvcache:50051#0": 0x6C41847FD02904A2}
GOLDEN_REPLICAS = {
    bytes([0]) * 16: [S2, S3],
    bytes([1]) * 16: [S3, S1],
    bytes([2]) * 16: [S3, S1],
    bytes([3]) * 16: [S0, S3],
    bytes([4]) * 16: [S0, S2],
    bytes([5]) * 16: [S2, S1],
    bytes([6]) * 16: [S3, S0],
    bytes([7]) * 16: [S1, S3],
}


def random_keys(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


def test_golden_points_and_replicas():
    for data, point in GOLDEN_POINTS.items():
        assert ring_point(data) == point
    ring = HashRing(SHARDS)
    assert {key: ring.replicas(key, 2) for key in GOLDEN_REPLICAS} == GOLDEN_REPLICAS


def test_same_list_same_replicas_across_instances_and_order():
    keys = random_keys(500)
    a, b, shuffled = HashRing(SHARDS), HashRing(SHARDS), HashRing(list(reversed(SHARDS)))
    for key in keys:
        assert a.replicas(key, 3) == b.replicas(key, 3) == shuffled.replicas(key, 3)


def test_same_replicas_in_another_process_with_another_hash_seed():
    keys = random_keys(50)
    script = ("import json, sys; from cloudmatrix.kvcache.ring import HashRing; "
              "keys = [bytes.fromhex(k) for k in json.loads(sys.argv[1])]; "
              f"ring = HashRing({SHARDS!r}); print(json.dumps([ring.replicas(k, 2) for k in keys]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script, json.dumps([k.hex() for k in keys])], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    ring = HashRing(SHARDS)
    assert json.loads(out) == [ring.replicas(k, 2) for k in keys]


def test_replicas_are_distinct_and_primary_first():
    ring = HashRing(SHARDS)
    for key in random_keys(1000):
        reps = ring.replicas(key, 3)
        assert len(reps) == len(set(reps)) == 3
        assert reps[0] == ring.primary(key)
        assert ring.replicas(key, 2) == reps[:2]  # a smaller r is a prefix of a larger one
    assert sorted(ring.replicas(b"k" * 16, 10)) == sorted(SHARDS)  # capped at the shard count
    assert HashRing([]).replicas(b"k" * 16, 2) == []


@pytest.mark.parametrize("n", [3, 4, 5])
@pytest.mark.parametrize("naming", ["kvcache-{i}.kvcache:50051", "127.0.0.1:{port}"])
def test_balance_with_64_vnodes(n, naming):
    ring = HashRing([naming.format(i=i, port=50051 + i) for i in range(n)])
    keys = random_keys(10_000)
    primaries = collections.Counter(ring.primary(k) for k in keys)
    holders = collections.Counter(s for k in keys for s in ring.replicas(k, 2))
    assert len(primaries) == n
    for shard in ring.shards:
        assert 0.7 < primaries[shard] * n / len(keys) < 1.3, primaries
        assert 0.7 < holders[shard] * n / (2 * len(keys)) < 1.3, holders


def test_adding_a_shard_moves_about_a_quarter_and_nothing_else():
    keys = random_keys(10_000)
    three, four = HashRing(SHARDS[:3]), HashRing(SHARDS)
    moved = [k for k in keys if three.primary(k) != four.primary(k)]
    assert all(four.primary(k) == S3 for k in moved)  # keys only ever move to the new shard
    assert 0.18 < len(moved) / len(keys) < 0.32
    for key in keys:
        after = four.replicas(key, 2)
        if S3 not in after:
            assert after == three.replicas(key, 2)
        else:  # the new shard slots in; the others keep their relative order
            assert [s for s in after if s != S3] == three.replicas(key, 2)[:1]


def test_remove_undoes_add():
    keys = random_keys(2000)
    ring = HashRing(SHARDS[:3])
    before = [ring.replicas(k, 2) for k in keys]
    ring.add(S3)
    ring.remove(S3)
    assert [ring.replicas(k, 2) for k in keys] == before
    assert ring.shards == SHARDS[:3] and S3 not in ring


def test_bad_input_says_what_to_change():
    with pytest.raises(ValueError, match="already on the ring"):
        HashRing([S0, S0])
    with pytest.raises(ValueError, match="not on the ring"):
        HashRing([S0]).remove(S1)
    with pytest.raises(ValueError, match="r must be >= 1"):
        HashRing([S0]).replicas(b"k", 0)
    with pytest.raises(ValueError, match="vnodes"):
        HashRing([S0], vnodes=0)
