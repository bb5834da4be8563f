"""A kvcache shard SIGKILLed while the benchmark client's requests run through the whole system
(gateway, prefill, decode, 3 shards, R=2): every request completes with the local engine's tokens,
the supervisor restarts the shard (memory only: it comes back empty), and anti-entropy puts back
every replica it owes; no block the pool held is lost, and prefix reuse works on afterwards."""
from __future__ import annotations

import asyncio
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloudmatrix.bench.serve.runner import LoadShape, run_load
from cloudmatrix.bench.serve.workload import BenchRequest
from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.clients import KvShardClient
from cloudmatrix.kvcache.client import KvPoolClient
from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.processes import is_alive, load_state
from cloudmatrix.launcher.topology import parse_topology
from cloudmatrix.model.generate import generate
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.sampling_params import SamplingParams
from tests.services import decode_running
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(400)
OUTPUT_LEN = 48


def _topology(checkpoint: Path):
    common = {"checkpoint": str(checkpoint), "precision": "fp32", "kvcache": "{addresses:kvcache}"}
    return parse_topology({"name": "pool-faults", "services": [
        {"name": "kvcache", "service": "kvcache", "count": 3, "restart": "on-failure"},
        {"name": "pdie", "service": "npu_emulator"}, {"name": "ddie", "service": "npu_emulator"},
        {"name": "prefill", "service": "prefill", "set": {**common, "dies": "{addresses:pdie}"}},
        {"name": "decode", "service": "decode", "set": {**common, "dies": "{addresses:ddie}"}},
        {"name": "gateway", "service": "gateway", "set": {
            "checkpoint": str(checkpoint), "prefill": "{addresses:prefill}", "decode": "{addresses:decode}"}}]},
        Path("."))


def _placement(shards: list[str]) -> tuple[dict[str, set[bytes]], dict[bytes, list[str]]]:
    """Every shard's keys (ListKeys), and each key's ring replicas as the instances' pool clients place it."""
    async def scan():
        held = {}
        for address in shards:
            async with KvShardClient(address) as shard:
                held[address] = set(await shard.all_keys())
        async with KvPoolClient(shards) as pool:
            return held, {key: pool.replicas(key) for keys in held.values() for key in keys}

    return asyncio.run(scan())


def _missing_replicas(shards: list[str]) -> int:
    held, owners = _placement(shards)
    return sum(key not in held[address] for key, replicas in owners.items() for address in replicas)


def test_a_kvcache_shard_killed_under_load_loses_nothing_and_gets_its_replicas_back(tmp_path, tiny_checkpoint):
    run_dir = tmp_path / "run"
    bring_up(_topology(Path(tiny_checkpoint)), run_dir, 180.0)
    try:
        records = {r.name: r for r in load_state(run_dir)}
        shards = [records[f"kvcache-{i}"].address for i in range(3)]
        tokenizer = TextTokenizer.load(tiny_checkpoint)
        model = load_for_precision(tiny_checkpoint, parse_precision("fp32"))
        shared = tokenizer.encode("A system prompt that every request shares, long enough for several KV blocks. " * 2)
        requests = [BenchRequest(shared + tokenizer.encode(f" Question {i}?"), OUTPUT_LEN) for i in range(16)]
        expected = [tokenizer.decode(list(generate(model, r.prompt, SamplingParams(max_tokens=OUTPUT_LEN),
                                                   ignore_eos=True))) for r in requests]
        port = json.loads((run_dir / "ready" / "gateway-0.http.json").read_text())["http_port"]
        url, model_id = f"http://127.0.0.1:{port}", Path(tiny_checkpoint).resolve().name

        def load(batch: list[BenchRequest]):
            return asyncio.run(run_load(url, model_id, batch, LoadShape(concurrency=4), timeout_s=240.0))[0]

        assert all(r.ok for r in load(requests[:2]))  # the shared prefix is in the pool now
        victim = records["kvcache-1"]
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(load, requests[2:])
            assert wait_for(lambda: decode_running(records["decode-0"].address) >= 1, timeout_s=120.0)
            before, _ = _placement(shards)
            os.kill(victim.pid, signal.SIGKILL)
            results = running.result()
        assert [r.error for r in results] == [""] * len(results)  # every request completed ...
        assert [r.text for r in results] == expected[2:]        # ... with the local engine's tokens

        def restarted() -> bool:
            record = next(r for r in load_state(run_dir) if r.name == "kvcache-1")
            return record.restarts == 1 and is_alive(record) and health_check_sync(record.address) == "SERVING"

        assert wait_for(restarted, timeout_s=120.0)
        assert wait_for(lambda: _missing_replicas(shards) == 0, timeout_s=120.0)  # anti-entropy refilled it
        after, _ = _placement(shards)
        assert set().union(*before.values()) <= set().union(*after.values())  # no block lost
        assert before[victim.address] <= after[victim.address]  # the shard holds again what it held

        again = load([requests[0]])[0]  # prefix reuse on the rejoined pool
        assert again.ok and again.text == expected[0] and again.cached_tokens > 0
    finally:
        bring_down(run_dir, grace_s=5.0)
