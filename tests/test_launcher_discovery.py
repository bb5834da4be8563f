"""The local launcher finds processes started later, as Kubernetes finds pods: the gateway names its
instances `{endpoints:prefill}` / `{endpoints:decode}` and the instances and shards the pool
`{endpoints:kvcache}` (the ready files of the SERVING processes). A decode instance started after
`cmx up` (with its own die) gets requests once it is SERVING, and a kvcache shard started later
joins the pool: the instances write blocks to it, and the keeper copies it the blocks it owes."""
from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from cloudmatrix.clients import KvShardClient
from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.processes import ProcessRecord, spawn, stop_all, wait_healthy
from cloudmatrix.launcher.topology import ProcessSpec, parse_topology
from cloudmatrix.rpc.channel import health_check_sync
from tests.waiting import under_traffic

pytestmark = pytest.mark.timeout(400)


def _topology(checkpoint: Path):
    common = {"checkpoint": str(checkpoint), "precision": "fp32", "kvcache": "{endpoints:kvcache}"}
    return parse_topology({"name": "late-processes", "services": [
        {"name": "kvcache", "service": "kvcache", "set": {"members": "{endpoints:kvcache}"}},
        {"name": "pdie", "service": "npu_emulator"}, {"name": "ddie", "service": "npu_emulator"},
        {"name": "prefill", "service": "prefill", "set": {**common, "dies": "{addresses:pdie}"}},
        {"name": "decode", "service": "decode", "set": {**common, "dies": "{addresses:ddie}"}},
        {"name": "gateway", "service": "gateway", "set": {
            "checkpoint": str(checkpoint), "prefill": "{endpoints:prefill}", "decode": "{endpoints:decode}"}}]},
        Path("."))


def _start(run_dir: Path, name: str, service: str, *overrides: str) -> ProcessRecord:
    """A process started after `cmx up`, by hand, named as its entry's next process."""
    proc, record = spawn(ProcessSpec(name, service, "127.0.0.1", 0, None, overrides), run_dir)
    wait_healthy([(proc, record)], health_check_sync, 180.0)
    return record


def _steps(record: ProcessRecord) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{record.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(r"(?m)^cmx_engine_step_seconds_count\{[^}]*\} (\S+)$", text))


def _stored(record: ProcessRecord) -> int:
    async def stats() -> int:
        async with KvShardClient(record.address) as shard:
            return (await shard.stats())["blocks"]
    return asyncio.run(stats())


def _until(condition, client: openai.OpenAI) -> float:
    """Short completions through the gateway until ``condition()``; the moment it held."""
    model = client.models.list().data[0].id

    def request(i: int) -> None:
        reply = client.completions.create(model=model, prompt=f"A late process {i} and the pool", max_tokens=4,
                                          temperature=0, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 4
    return under_traffic(condition, request)


def test_processes_started_after_cmx_up_are_found_by_the_gateway_and_the_pool(tmp_path, tiny_checkpoint,
                                                                              record_property):
    run_dir = tmp_path / "run"
    bring_up(_topology(Path(tiny_checkpoint)), run_dir, 180.0)
    late: list[ProcessRecord] = []
    try:
        port = json.loads((run_dir / "ready" / "gateway-0.http.json").read_text())["http_port"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        late.append(_start(run_dir, "ddie-1", "npu_emulator"))
        late.append(_start(run_dir, "decode-1", "decode", f"checkpoint={tiny_checkpoint}", "precision=fp32",
                           f"dies={late[0].address}", f"kvcache=ready:{run_dir / 'ready' / 'kvcache'}",
                           "instance_id=decode-1"))
        serving = time.monotonic()
        first = _until(lambda: _steps(late[1]) > 0, client)  # the gateway picked the new instance
        record_property("late_decode_first_step_s", round(first - serving, 2))

        late.append(_start(run_dir, "kvcache-1", "kvcache", f"members=ready:{run_dir / 'ready' / 'kvcache'}",
                           f"disk_dir={run_dir / 'kvcache-1'}"))
        _until(lambda: _stored(late[2]) > 0, client)  # on the instances' rings: blocks reach it
    finally:
        stop_all(late, grace_s=10.0)
        bring_down(run_dir, grace_s=10.0)
