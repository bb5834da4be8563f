"""Drive a workload against the gateway: closed loop at a fixed concurrency, open loop at a
Poisson rate (gamma inter-arrivals with a burstiness factor, as vLLM's bench does), or the
arrival times a trace carries. A progress bar on stderr while it runs."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import aiohttp
from tqdm import tqdm

from cloudmatrix.bench.serve.client import RequestResult, send
from cloudmatrix.bench.serve.workload import BenchRequest


@dataclasses.dataclass(frozen=True)
class LoadShape:
    """One of: ``concurrency`` (closed loop), ``rate`` req/s (open loop, Poisson when burstiness
    is 1), or ``trace`` (each request at its arrival_s)."""

    concurrency: int = 0
    rate: float = 0.0
    burstiness: float = 1.0
    trace: bool = False
    seed: int = 0

    def describe(self) -> dict:
        if self.trace:
            return {"mode": "trace"}
        if self.rate:
            return {"mode": "rate", "rate": self.rate, "burstiness": self.burstiness}
        return {"mode": "concurrency", "concurrency": self.concurrency}


async def run_load(url: str, model: str, requests: list[BenchRequest], shape: LoadShape,
                   timeout_s: float = 600.0, label: str = "") -> tuple[list[RequestResult], float]:
    """Every request's result (in request order) and the wall seconds of the whole run."""
    limit = asyncio.Semaphore(shape.concurrency or len(requests) or 1)
    delays = arrival_times(len(requests), shape, requests)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    progress = tqdm(total=len(requests), desc=label or "requests", unit="req", leave=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()

        async def one(request: BenchRequest, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with limit:
                result = await send(session, url, model, request)
            progress.update(1)
            return result

        results = await asyncio.gather(*(one(r, at) for r, at in zip(requests, delays)))
        elapsed = time.perf_counter() - start
    progress.close()
    return list(results), elapsed


def arrival_times(count: int, shape: LoadShape, requests: list[BenchRequest]) -> list[float]:
    if shape.trace:
        return [r.arrival_s for r in requests]
    if not shape.rate:
        return [0.0] * count
    rng, at, out = random.Random(shape.seed), 0.0, []
    theta = 1.0 / (shape.rate * shape.burstiness)
    for _ in range(count):
        out.append(at)
        at += rng.gammavariate(shape.burstiness, theta)
    return out
