"""The pool as a whole: 3 disk-backed shards, R = 2. A shard SIGKILLed mid-run loses no acknowledged
block; restarted, read repair restores the replicas it lost. Prefix lookups agree across
processes."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest
import torch

from cloudmatrix.clients import KvShardClient
from cloudmatrix.kv.hashing import namespace, prefix_keys
from cloudmatrix.kvcache import Block, KvPoolClient
from cloudmatrix.launcher.processes import spawn, wait_healthy
from cloudmatrix.launcher.topology import ProcessSpec
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.rpc.tensor_codec import encode_tensor
from tests.services import running_services
from tests.test_kvcache_client import free_port

pytestmark = pytest.mark.timeout(240)
NS = namespace("cmx-tiny", "float32", 4, "fp32")
FAST = {"deadline_s": 10.0, "retries": 1, "down_after": 1, "probe_interval_s": 0.2}  # a dead shard refuses at once


def _shard_spec(name: str, port: int, disk: str) -> tuple[str, str, tuple[str, ...]]:
    return name, "kvcache", (f"server.port={port}", f"disk_dir={disk}")


def _blocks(n: int, seed: int) -> list[Block]:
    gen = torch.Generator().manual_seed(seed)
    keys = prefix_keys(torch.randint(3, 1024, (4 * n,), generator=gen).tolist(), 4, NS).full
    return [Block(k, NS, "full", 4, encode_tensor(torch.randn(4, 4, 80, generator=gen)).SerializeToString())
            for k in keys]


async def _read_back(addresses, blocks) -> dict[bytes, bytes | None]:
    async with KvPoolClient(addresses, **FAST) as client:
        got = await client.get_blocks([b.key for b in blocks])
    return {k: (v.data if v is not None else None) for k, v in got.items()}


def test_sigkilled_shard_loses_no_acknowledged_block_and_repair_restores_it(tmp_path):
    names = [f"kv{i}" for i in range(3)]
    ports = {n: free_port() for n in names}
    specs = [_shard_spec(n, ports[n], str(tmp_path / f"disk-{n}")) for n in names]
    with running_services(tmp_path, specs) as records:
        addresses = [records[n].address for n in names]
        victim = records["kv1"]
        before, after = _blocks(30, seed=1), _blocks(30, seed=2)

        async def write_kill_write():
            async with KvPoolClient(addresses, **FAST) as strict, \
                    KvPoolClient(addresses, write_quorum=1, **FAST) as degraded:
                acked = [r.acknowledged for r in await strict.put_blocks(before)]
                os.kill(victim.pid, signal.SIGKILL)
                strict_after = await strict.put_blocks(after)  # keys with kv1 as replica: on a stand-in
                degraded_after = await degraded.put_blocks(after)
                return acked, strict_after, degraded_after, strict.replicas

        acked, strict_after, degraded_after, replicas = asyncio.run(write_kill_write())
        assert all(acked)
        on_victim = [victim.address in replicas(b.key) for b in after]
        assert all(r.acknowledged for r in strict_after)  # W=2 never lies: two live shards hold each block,
        for result, owed in zip(strict_after, on_victim):    # kv1's share on the next shard along the ring
            assert len(result.stored_on) == 2 and victim.address not in result.stored_on
            assert (set(result.stored_on) == set(result.replicas)) == (not owed)
            assert (victim.address in result.errors) == owed
        assert all(r.acknowledged for r in degraded_after)  # W=1 keeps the pool writable
        data = asyncio.run(_read_back(addresses, before + after))  # kv1 is still dead
        assert all(data[b.key] == b.data for b in before + after)  # bit for bit

        restarted, record = spawn(ProcessSpec("kv1", "kvcache", "127.0.0.1", ports["kv1"], None,
                                              (f"disk_dir={tmp_path / 'disk-kv1'}",)), tmp_path)
        try:
            wait_healthy([(restarted, record)], health_check_sync, timeout_s=60)

            async def after_restart():
                # The restarted shard lost its memory tier (nothing was evicted to disk yet): reading
                # the keys it is primary for finds them on the secondary and repairs them onto it.
                primary = [b for b in before + after if replicas(b.key)[0] == victim.address]
                async with KvPoolClient([victim.address], replication=1, **FAST) as only_victim:
                    missing_before = sum(not p for p in await only_victim.presence([b.key for b in primary]))
                async with KvPoolClient(addresses, **FAST) as client:
                    data = await client.get_blocks([b.key for b in primary])
                    repaired = await client.drain_repairs()
                async with KvPoolClient([victim.address], replication=1, **FAST) as only_victim:
                    back = await only_victim.presence([b.key for b in primary])
                    fetched = await only_victim.get_blocks([b.key for b in primary])
                return primary, missing_before, data, repaired, back, fetched

            primary, missing_before, data, repaired, back, fetched = asyncio.run(after_restart())
            assert primary and missing_before == len(primary) and repaired == len(primary)
            assert all(data[b.key].data == b.data for b in primary)
            assert all(back) and all(fetched[b.key].data == b.data for b in primary)  # replicas back, bit for bit
        finally:
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(timeout=15)


def test_lookup_finds_the_prefix_another_process_wrote(tmp_path):
    names = [f"kv{i}" for i in range(3)]
    specs = [(n, "kvcache", ()) for n in names]
    with running_services(tmp_path, specs) as records:
        addresses = [records[n].address for n in names]
        tokens = list(range(100, 140))  # 10 full blocks of 4
        writer = f"""
import asyncio, torch
from cloudmatrix.kv.hashing import namespace, prefix_keys
from cloudmatrix.clients import KvShardClient
from cloudmatrix.kvcache import Block, KvPoolClient
from cloudmatrix.rpc.tensor_codec import encode_tensor
async def main():
    keys = prefix_keys({tokens[:24]}, 4, namespace("cmx-tiny", "float32", 4, "fp32")).full
    data = encode_tensor(torch.ones(4, 4, 80)).SerializeToString()
    async with KvPoolClient({addresses!r}) as client:
        results = await client.put_blocks([Block(k, "{NS}", "full", 4, data) for k in keys])
    assert all(r.acknowledged for r in results)
asyncio.run(main())
"""
        run = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONHASHSEED": "7"})
        assert run.returncode == 0, run.stderr

        async def lookup():
            async with KvPoolClient(addresses) as client:
                return await client.lookup(list(prefix_keys(tokens, 4, NS).full))

        assert asyncio.run(lookup()) == 6  # 24 tokens = 6 blocks cached; blocks 7-10 never written


def test_a_restarted_shard_gets_back_every_replica_it_should_hold_by_anti_entropy_without_reads(tmp_path):
    """A shard SIGKILLed (memory only: it comes back empty) while a long-lived pool client keeps
    working: the client marks it down, probes it back up, and its anti-entropy pass copies every
    block the shard should hold onto it, with no read of those blocks. ListKeys pages through."""
    names = [f"kv{i}" for i in range(3)]
    ports = {n: free_port() for n in names}
    with running_services(tmp_path, [(n, "kvcache", (f"server.port={ports[n]}",)) for n in names]) as records:
        addresses = [records[n].address for n in names]
        victim = records["kv1"]
        blocks = _blocks(60, seed=5)

        async def scenario():
            async with KvPoolClient(addresses, **FAST) as pool:
                assert all(r.acknowledged for r in await pool.put_blocks(blocks))
                owed = [b for b in blocks if victim.address in pool.replicas(b.key)]
                os.kill(victim.pid, signal.SIGKILL)
                await pool.lookup([b.key for b in owed[:1]])  # the failure marks it down
                assert victim.address in pool.down_shards
                proc, record = spawn(ProcessSpec("kv1", "kvcache", "127.0.0.1", ports["kv1"], None, ()), tmp_path)
                try:
                    await asyncio.to_thread(wait_healthy, [(proc, record)], health_check_sync, 60)
                    for _ in range(300):  # the probe finds it SERVING, which starts the pass
                        if victim.address not in pool.down_shards:
                            break
                        await asyncio.sleep(0.05)
                    copied = await pool.drain_anti_entropy()
                    async with KvShardClient(victim.address) as shard:
                        held = set(await shard.all_keys(page=7))  # several ListKeys pages
                        fetched = await shard.get_blocks([b.key for b in owed])
                    return owed, copied, held, fetched, await pool.anti_entropy()
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=15)

        owed, copied, held, fetched, second = asyncio.run(scenario())
        assert owed and copied == len(owed) and held == {b.key for b in owed}
        assert all(fetched[b.key].data == b.data for b in owed)  # bit for bit
        assert second == 0  # a second pass finds nothing to copy
