"""Least-loaded instance picking.

An instance's load is its running + waiting requests as its GetLoad reports them, fetched at most
once per ``refresh_s`` (one GetLoad round to every instance, with a short deadline), plus the change
in this gateway's own in-flight requests on it since that snapshot. So a burst between two
snapshots spreads over the instances, and requests this gateway finished stop counting at once,
without a GetLoad on every request. An instance whose GetLoad fails is skipped until the next
snapshot; when every instance fails, the request fails with PeerUnavailable.

The instances are found again at every snapshot (rpc/discovery.py: fixed addresses, a headless
Service's DNS records, the local launcher's ready files), so one the autoscaler or the launcher
adds is picked from the next snapshot after it turns SERVING. One that leaves is no longer picked;
requests already on it go on, and its client is retired (``on_retire``) once none is left.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

from cloudmatrix.rpc.discovery import Discovery, parse_sources
from cloudmatrix.rpc.errors import PeerUnavailable

log = logging.getLogger(__name__)

LoadFn = Callable[[str, float], Awaitable[int]]
RetireFn = Callable[[str], Awaitable[None]]


class InstancePicker:
    def __init__(self, kind: str, sources: tuple[str, ...], load: LoadFn, refresh_s: float = 1.0,
                 load_timeout_s: float = 2.0, on_retire: RetireFn | None = None) -> None:
        self.kind, self._load, self._on_retire = kind, load, on_retire
        self.discovery = Discovery(parse_sources(sources, kind), kind)
        self.addresses: tuple[str, ...] = ()             # the instances found at the last snapshot
        self.refresh_s, self.load_timeout_s = refresh_s, load_timeout_s
        self.in_flight: dict[str, int] = {}
        self._snapshot: dict[str, int | None] = {}      # remote load, None = unreachable
        self._at_snapshot: dict[str, int] = {}          # our in-flight count when it was taken
        self._taken = float("-inf")
        self._lock = asyncio.Lock()

    def load(self, address: str) -> int | None:
        """The estimated load of one instance; None when its last GetLoad failed."""
        remote = self._snapshot.get(address, 0)
        if remote is None:
            return None
        return max(0, remote + self.in_flight.get(address, 0) - self._at_snapshot.get(address, 0))

    async def pick(self, exclude: frozenset[str] = frozenset()) -> str:
        """The least-loaded reachable instance not in ``exclude`` (ties: the first listed); with
        none, the instances are found again at once (one may have appeared since the snapshot)."""
        for force in (False, True):
            await self._refresh(force)
            loads = [(load, i) for i, a in enumerate(self.addresses)
                     if a not in exclude and (load := self.load(a)) is not None]
            if loads:
                return self.addresses[min(loads)[1]]
        raise PeerUnavailable(f"no {self.kind} instance is available")

    async def reachable(self) -> list[str]:
        """The instances whose last GetLoad answered (refreshed when stale)."""
        await self._refresh()
        return [a for a in self.addresses if self.load(a) is not None]

    def mark_down(self, address: str) -> None:
        """A call to ``address`` failed with UNAVAILABLE: leave it out until the next refresh."""
        self._snapshot[address] = None

    @contextlib.contextmanager
    def using(self, address: str) -> Iterator[None]:
        """Count one of this gateway's requests on ``address`` while the body runs."""
        self.in_flight[address] = self.in_flight.get(address, 0) + 1
        try:
            yield
        finally:
            self.in_flight[address] -= 1

    async def _refresh(self, force: bool = False) -> None:
        async with self._lock:
            if not force and time.monotonic() - self._taken < self.refresh_s:
                return
            await self._discover()
            answers = await asyncio.gather(*(self._load(a, self.load_timeout_s) for a in self.addresses),
                                           return_exceptions=True)
            self._snapshot = {a: self._checked(a, r) for a, r in zip(self.addresses, answers)}
            self._at_snapshot = dict(self.in_flight)
            self._taken = time.monotonic()

    async def _discover(self) -> None:
        """The instances now; those gone with no request of ours left on them are retired."""
        found = await self.discovery.resolve()
        if self.discovery.dynamic:
            for address in sorted(set(found) - set(self.addresses)):
                log.info("instance found", extra={"kind": self.kind, "address": address})
        known = {*self.addresses, *self.in_flight}
        self.addresses = found
        for address in sorted(known - set(found)):
            if self.in_flight.get(address, 0):
                continue  # requests go on there; retired at a later snapshot
            self.in_flight.pop(address, None)
            self._snapshot.pop(address, None)
            log.info("instance gone", extra={"kind": self.kind, "address": address})
            if self._on_retire is not None:
                await self._on_retire(address)

    def _checked(self, address: str, answer: int | BaseException) -> int | None:
        """The load in one GetLoad answer; None for an unreachable instance, logged when it turns
        unreachable or reachable again (not at every refresh: a range of addresses may name many
        instances that do not exist yet)."""
        was_up = self._snapshot.get(address, 0) is not None
        if isinstance(answer, (PeerUnavailable, TimeoutError)):
            if was_up:
                log.warning("instance unreachable", extra={"kind": self.kind, "address": address, "error": str(answer)})
            return None
        if isinstance(answer, BaseException):
            raise answer
        if not was_up:
            log.info("instance reachable", extra={"kind": self.kind, "address": address})
        return answer
