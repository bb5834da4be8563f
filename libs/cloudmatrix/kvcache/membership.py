"""Pool membership that follows the shards running, instead of a list fixed at start-up.

The shards are found by a discovery source (rpc/discovery.py): in Kubernetes the kvcache headless
Service's records (``dns:///kvcache:50051``, its ready pods), under the local launcher its ready
files (``ready:<run_dir>/ready/kvcache``). Every address found is asked its identity (Stats): its
name on the ring, which it advertises (``kvcache-0.kvcache:50051``: a pod's stable name, so a
restarted pod with a new IP keeps its place on the ring), and its boot id, new at every start.

- A shard found is a member at once (a shard the StatefulSet adds is used from its first round).
- A member not found leaves after ``leave_after_s`` without being found again: a restart or a
  failed probe is shorter, and must not move blocks; while it is away the pool's stand-ins and
  replicas serve (health.py).
- A member found with a new boot id restarted (empty, or stale): its replicas are owed to it.

Every client (instance) follows the membership for placement; only the pool's keeper, one shard
(services/kvcache/keeper.py), moves blocks when it changes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from cloudmatrix.kvcache.shard_client import KvShardClient
from cloudmatrix.rpc.client import ClientOptions
from cloudmatrix.rpc.discovery import Discovery

log = logging.getLogger(__name__)

Identify = Callable[[str], Awaitable[tuple[str, str]]]  # address -> (name on the ring, boot id)


IDENTIFY_TIMEOUT_S = 2.0


@dataclasses.dataclass(frozen=True)
class Change:
    joined: tuple[str, ...] = ()
    left: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.joined or self.left or self.restarted)


class Membership:
    """The members now (names on the ring), updated by ``refresh``."""

    def __init__(self, sources: tuple[str, ...], *, leave_after_s: float = 30.0,
                 identify: Identify | None = None) -> None:
        if leave_after_s < 0:
            raise ValueError(f"leave_after_s must be >= 0, got {leave_after_s}")
        self.discovery = Discovery(sources, "kvcache")
        self.leave_after_s = leave_after_s
        self._identify = identify or self._identify_shard
        self.members: dict[str, str] = {}      # name -> boot id
        self._missing_since: dict[str, float] = {}
        self._clients: dict[str, KvShardClient] = {}  # address -> its client, kept between rounds

    async def _identify_shard(self, address: str) -> tuple[str, str]:
        """The shard's advertised name (its address when it advertises none) and boot id."""
        if address not in self._clients:
            self._clients[address] = KvShardClient(address, ClientOptions(deadline_s=IDENTIFY_TIMEOUT_S, retries=0))
        name, boot_id = await self._clients[address].identity()
        return name or address, boot_id

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    @property
    def names(self) -> list[str]:
        return sorted(self.members)

    async def refresh(self, now: float | None = None) -> Change:
        """Find the shards again; what changed since the last refresh."""
        now = time.monotonic() if now is None else now
        addresses = await self.discovery.resolve()
        for gone in [a for a in self._clients if a not in addresses]:
            await self._clients.pop(gone).close()
        answers = await asyncio.gather(*(self._identify(a) for a in addresses), return_exceptions=True)
        seen: dict[str, str] = {}
        for address, answer in zip(addresses, answers):
            if isinstance(answer, BaseException):
                log.debug("kvcache shard %s did not say who it is: %s", address, answer)
                continue
            seen[answer[0]] = answer[1]
        joined = tuple(sorted(n for n in seen if n not in self.members))
        restarted = tuple(sorted(n for n, boot in seen.items() if n in self.members and self.members[n] != boot))
        self.members.update(seen)
        for name in seen:
            self._missing_since.pop(name, None)
        left = []
        for name in sorted(set(self.members) - set(seen)):
            if now - self._missing_since.setdefault(name, now) >= self.leave_after_s:
                left.append(name)
                del self.members[name], self._missing_since[name]
        change = Change(joined, tuple(left), restarted)
        if change:
            log.info("kvcache membership changed", extra={"joined": list(joined), "left": left,
                                                          "restarted": list(restarted), "members": self.names})
        return change

    async def wait_for_members(self, timeout_s: float, interval_s: float = 0.5) -> list[str]:
        """Refresh until some member is found; TimeoutError naming the sources after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self.refresh()
            if self.members:
                return self.names
            if time.monotonic() > deadline:
                raise TimeoutError(f"no kvcache shard found at {', '.join(self.discovery.sources)} "
                                   f"within {timeout_s:.0f} s")
            await asyncio.sleep(interval_s)
