"""Shard liveness as the client sees it: consecutive failures mark a shard down, probes bring it back.

A failure is one RPC attempt that ended UNAVAILABLE or DEADLINE_EXCEEDED; any answer from the
shard (a reply, or an error status such as NOT_FOUND) resets the count. After ``down_after``
failures in a row the shard is down: callers skip it, and a background task runs the standard
gRPC health check every ``probe_interval_s`` until the shard reports SERVING, when it is up
again with a clean count. Probe tasks end with ``close()``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from cloudmatrix.rpc.channel import health_check

log = logging.getLogger(__name__)

HealthCheck = Callable[[str, float], Awaitable[str]]


class ShardHealth:
    """Per-shard consecutive-failure counts, the set of shards marked down, and their probes."""

    def __init__(self, *, down_after: int, probe_interval_s: float, probe_timeout_s: float,
                 check: HealthCheck = health_check,
                 on_up: Callable[[str], None] | None = None) -> None:
        if down_after < 1:
            raise ValueError(f"down_after must be >= 1, got {down_after}")
        if probe_interval_s <= 0:
            raise ValueError(f"probe_interval_s must be > 0, got {probe_interval_s}")
        self.down_after = down_after
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._check = check
        self._on_up = on_up
        self._failures: dict[str, int] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self.failed_probes: collections.Counter[str] = collections.Counter()  # probes that found a shard still down

    def is_up(self, shard: str) -> bool:
        return shard not in self._probes

    def up(self, shards: list[str]) -> list[str]:
        """``shards`` less those marked down, order kept."""
        return [s for s in shards if s not in self._probes]

    @property
    def down(self) -> set[str]:
        return set(self._probes)

    def record_success(self, shard: str) -> None:
        self._failures[shard] = 0

    def record_failure(self, shard: str) -> bool:
        """Count one failed attempt; True when this failure marks the shard down."""
        if shard in self._probes:
            return False
        self._failures[shard] = self._failures.get(shard, 0) + 1
        if self._failures[shard] < self.down_after:
            return False
        log.warning("kvcache shard %s marked down after %d consecutive failures", shard, self._failures[shard])
        self._probes[shard] = asyncio.create_task(self._probe(shard), name=f"kvcache-probe-{shard}")
        return True

    def forget(self, shard: str) -> None:
        """Drop all state for a shard that left the ring."""
        self._failures.pop(shard, None)
        probe = self._probes.pop(shard, None)
        if probe is not None:
            probe.cancel()

    async def close(self) -> None:
        probes = list(self._probes.values())
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)

    async def _probe(self, shard: str) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            status = await self._check(shard, self.probe_timeout_s)
            if status == "SERVING":
                break
            self.failed_probes[shard] += 1
            log.debug("kvcache shard %s still down: health %s", shard, status)
        self._failures[shard] = 0
        del self._probes[shard]
        log.warning("kvcache shard %s is SERVING again", shard)
        if self._on_up is not None:
            self._on_up(shard)
