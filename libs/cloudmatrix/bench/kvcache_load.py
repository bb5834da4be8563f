"""Model load time: a die's weights read from the checkpoint on disk vs from the pool's model cache."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cloudmatrix.kvcache import KvPoolClient
from cloudmatrix.model.checkpoint import read_state_dict
from cloudmatrix.model.config import load_config
from cloudmatrix.model.presets import create_checkpoint
from cloudmatrix.model_cache import CacheReport, load_units, units_for


def bench_model_load(shards: list[str], preset: str, tmp: Path) -> dict:
    checkpoint = create_checkpoint(preset, tmp / f"ckpt-{preset}")
    cfg = load_config(checkpoint)
    units = units_for(lambda key: True, cfg)  # one die holding every expert

    start = time.perf_counter()
    state = read_state_dict(checkpoint, cfg)
    disk_s = time.perf_counter() - start

    async def from_pool(report: CacheReport) -> float:
        async with KvPoolClient(shards, replication=2, deadline_s=60.0) as client:
            start = time.perf_counter()
            await load_units(client, f"bench/{preset}", checkpoint, units, report)
            return time.perf_counter() - start

    first, second = CacheReport(), CacheReport()
    publish_s = asyncio.run(from_pool(first))
    pool_s = asyncio.run(from_pool(second))
    assert second.fully_cached, "the second load did not come from the pool"
    return {"preset": preset, "bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "disk_s": disk_s, "pool_s": pool_s, "publish_s": publish_s, "units": len(units),
            "note": "disk: safetensors from the page cache (warm); pool: over gRPC from 3 shards"}
