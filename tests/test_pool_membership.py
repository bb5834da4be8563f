"""A pool that scales: shard processes find each other from their ready files (the launcher's
discovery source; Kubernetes uses the headless Service's records the same way), a client follows
the membership, and while it writes and reads without pause a shard joins and then the keeper (the
lowest-named member) leaves with a SIGTERM. No acknowledged block is lost or read wrong at any
point, the blocks end up on the replicas of the final ring (the keeper moved them: the clients
never run anti-entropy), and no other shard process restarts."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal

import pytest
import torch

from cloudmatrix.clients import KvShardClient
from cloudmatrix.kv.hashing import namespace
from cloudmatrix.kvcache import Block, KvPoolClient
from cloudmatrix.kvcache.membership import Change, Membership
from cloudmatrix.launcher.processes import ProcessRecord, spawn, stop_all, wait_healthy
from cloudmatrix.launcher.topology import ProcessSpec
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.rpc.tensor_codec import encode_tensor

pytestmark = pytest.mark.timeout(300)
NS = namespace("cmx-tiny", "float32", 4, "fp32")
LEAVE_AFTER_S = 1.0


def _start(run_dir, index: int) -> ProcessRecord:
    spec = ProcessSpec(f"kvcache-{index}", "kvcache", "127.0.0.1", 0, None, (
        f"members=ready:{run_dir / 'ready' / 'kvcache'}", "membership_interval_s=0.2",
        f"leave_after_s={LEAVE_AFTER_S}", "server.grace_s=5"))
    proc, record = spawn(spec, run_dir)
    wait_healthy([(proc, record)], health_check_sync, 120.0)
    return record


def _tensor(rng: random.Random) -> bytes:
    """A block's data: a serialized tensor of random values (what shards accept)."""
    gen = torch.Generator().manual_seed(rng.getrandbits(32))
    return encode_tensor(torch.randn(4, 2, rng.randint(8, 64), generator=gen)).SerializeToString()


class Load:
    """Puts of fresh random blocks and Gets of acknowledged ones, without pause, through ``pool``."""

    def __init__(self, pool: KvPoolClient) -> None:
        self.pool, self.acked, self.wrong = pool, {}, []
        self.rounds, self._stop = 0, asyncio.Event()

    async def run(self) -> None:
        rng = random.Random(7)
        while not self._stop.is_set():
            blocks = [Block(rng.randbytes(16), NS, "full", 4, _tensor(rng)) for _ in range(8)]
            for block, result in zip(blocks, await self.pool.put_blocks(blocks)):
                if result.acknowledged:
                    self.acked[block.key] = block.data
            keys = rng.sample(sorted(self.acked), min(16, len(self.acked)))
            got = await self.pool.get_blocks(keys)
            self.wrong += [k for k in keys if got[k] is None or got[k].data != self.acked[k]]
            self.rounds += 1

    async def for_rounds(self, n: int, running: asyncio.Task) -> None:
        start = self.rounds
        while self.rounds < start + n:
            if running.done():
                running.result()  # the load failed: its error
                raise AssertionError("the load stopped")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()


async def _holds(shard: str, keys: list[bytes]) -> list[bool]:
    async with KvShardClient(shard) as client:
        present, _ = await client.lookup(keys)
    return present


async def _misplaced(pool: KvPoolClient, acked: dict[bytes, bytes]) -> int:
    """Replicas (by the pool's ring) that lack their block."""
    owed: dict[str, list[bytes]] = {}
    for key in acked:
        for shard in pool.replicas(key):
            owed.setdefault(shard, []).append(key)
    missing = 0
    for shard, keys in owed.items():
        missing += sum(not here for here in await _holds(shard, keys))
    return missing


def test_a_shard_joins_and_the_keeper_leaves_under_load_and_no_acknowledged_block_is_lost(tmp_path):
    run_dir = tmp_path / "run"
    records = [_start(run_dir, 0), _start(run_dir, 1)]
    try:
        async def scenario() -> None:
            membership = Membership((f"ready:{run_dir / 'ready' / 'kvcache'}",), leave_after_s=LEAVE_AFTER_S)
            await _until(lambda: len(membership.members) == 2, membership)
            pool = KvPoolClient(membership.names, replication=2, elastic=True, repair_on_rejoin=False,
                                probe_interval_s=0.2, down_after=1)
            changes: list[Change] = []

            async def seen(change: Change) -> None:
                if change:
                    changes.append(change)

            pool.follow(membership, 0.2, seen)
            load = Load(pool)
            running = asyncio.create_task(load.run())
            try:
                await load.for_rounds(5, running)
                records.append(await asyncio.to_thread(_start, run_dir, 2))   # joins
                joined = records[2].address
                await _until(lambda: joined in pool.ring)
                await load.for_rounds(10, running)
                keeper = min(pool.ring.shards)                                  # leaves
                leaving = next(r for r in records if r.address == keeper)
                os.kill(leaving.pid, signal.SIGTERM)
                await _until(lambda: keeper not in pool.ring)
                await load.for_rounds(10, running)
            finally:
                load.stop()
                await running
            assert load.wrong == [] and len(load.acked) > 100
            assert [c.joined for c in changes if c.joined] == [(joined,)]
            assert [c.left for c in changes if c.left] == [(keeper,)]
            for _ in range(600):  # the new keeper moves every block to the final ring's replicas
                if await _misplaced(pool, load.acked) == 0:
                    break
                await asyncio.sleep(0.1)
            assert await _misplaced(pool, load.acked) == 0
            got = await pool.get_blocks(list(load.acked))
            assert all(got[k] is not None and got[k].data == v for k, v in load.acked.items())
            await pool.close()
            return min(pool.ring.shards)

        keeper = asyncio.run(scenario())
        survivors = [r for r in records if health_check_sync(r.address) == "SERVING"]
        assert len(survivors) == 2 and all(_alive(r.pid) for r in survivors)  # the same processes: no restart
        passes = sorted((json.loads(line) for r in records for line in open(r.log) if "kvcache keeper pass" in line),
                        key=lambda p: p["ts"])
        assert len(passes) >= 2 and passes[-1]["keeper"] == keeper
        assert all(p["keeper"] == min(p["members"]) for p in passes)  # one shard per membership moved blocks
    finally:
        stop_all(records, grace_s=5.0)


async def _until(condition, membership: Membership | None = None, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if membership is not None:
            await membership.refresh()
        if condition():
            return
        assert loop.time() < deadline, "condition not met"
        await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_membership_joins_at_once_leaves_after_its_grace_and_tells_a_restart_by_its_boot_id(tmp_path):
    """Against fake shards: what answers is a member at once, one not found (gone, or not
    answering) leaves only after ``leave_after_s``, a new boot id is a restart, and the pool's
    ring follows, never left without a shard and never keeping one that left."""
    shards = {"a:1": ("kvcache-0", "boot-1"), "b:1": ("kvcache-1", "boot-1")}

    async def identify(address: str) -> tuple[str, str]:
        if address not in shards:
            raise ConnectionError(address)
        return shards[address]

    async def scenario() -> None:
        membership = Membership(("a:1", "b:1"), leave_after_s=10.0, identify=identify)
        assert await membership.refresh(now=0.0) == Change(joined=("kvcache-0", "kvcache-1"))
        pool = KvPoolClient(membership.names, replication=2, elastic=True, repair_on_rejoin=False)
        del shards["b:1"]                                        # away: a restart, or leaving
        assert not await membership.refresh(now=5.0) and membership.names == ["kvcache-0", "kvcache-1"]
        shards["b:1"] = ("kvcache-1", "boot-2")                  # back within the grace, restarted
        assert await membership.refresh(now=9.0) == Change(restarted=("kvcache-1",))
        del shards["b:1"]
        assert not await membership.refresh(now=20.0)
        change = await membership.refresh(now=30.0)              # 10 s not found: it left
        assert change == Change(left=("kvcache-1",))
        pool.apply(change, membership.members)
        assert pool.ring.shards == ["kvcache-0"]
        del shards["a:1"]                                        # the last one leaves: kept on the ring
        await membership.refresh(now=31.0)
        pool.apply(await membership.refresh(now=45.0), membership.members)
        assert pool.ring.shards == ["kvcache-0"] and membership.members == {}
        shards["c:1"] = ("kvcache-2", "boot-1")
        membership.discovery.sources = ("c:1",)
        pool.apply(await membership.refresh(now=46.0), membership.members)
        assert pool.ring.shards == ["kvcache-2"]                 # the stale one is dropped then
        await pool.close()

    asyncio.run(scenario())
