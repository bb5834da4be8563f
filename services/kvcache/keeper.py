"""The pool's keeper: one shard moves the blocks when the pool's membership changes.

Every shard started with ``members`` follows the membership (libs/cloudmatrix/kvcache/
membership.py). The member with the lowest name, as a shard sees them, is the keeper: after a
shard joined, left or restarted it runs one anti-entropy pass over the members (antientropy.py),
which copies every block to the replicas the new ring gives it and that lack it. A pass during
which a member was down is run again ``RETRY_S`` later (the member may lack what the stand-ins
took), and a keeper that starts (or restarts) runs one at once. One pass at a time. The other shards only follow, and the instances only place blocks by the ring: one
change is one pass, not one per client.
"""
from __future__ import annotations

import asyncio
import logging

from cloudmatrix.kvcache.client import KvPoolClient
from cloudmatrix.kvcache.membership import Change, Membership

log = logging.getLogger(__name__)
RETRY_S = 30.0  # a pass that a down member missed is run again this much later


class PoolKeeper:
    def __init__(self, name: str, sources: tuple[str, ...], *, replication: int, interval_s: float,
                 leave_after_s: float, start_timeout_s: float = 600.0) -> None:
        self.name, self.replication, self.interval_s = name, replication, interval_s
        self.membership = Membership(sources, leave_after_s=leave_after_s)
        self.start_timeout_s = start_timeout_s
        self.pool: KvPoolClient | None = None
        self.passes = 0            # anti-entropy passes this shard ran as the keeper
        self.copied = 0            # blocks they copied
        self._owed = True          # a pass is due (at start: this shard may be the keeper)
        self._retry_at = 0.0       # loop time before which a pass owed to a down member waits
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_keeper(self) -> bool:
        return bool(self.membership.members) and self.name == min(self.membership.members)

    def start(self) -> None:
        """Find the members (in the background: this shard may not be listed yet), then follow them."""
        self._task = asyncio.get_running_loop().create_task(self._start(), name="kvcache-keeper")
        self._task.add_done_callback(self._failed)

    @staticmethod
    def _failed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("kvcache keeper stopped: this shard will not move blocks: %s", task.exception())

    async def _start(self) -> None:
        names = await self.membership.wait_for_members(self.start_timeout_s, self.interval_s)
        self.pool = KvPoolClient(names, replication=self.replication, elastic=True, repair_on_rejoin=False)
        await self._round(Change())
        self.pool.follow(self.membership, self.interval_s, self._round)

    async def _round(self, change: Change) -> None:
        loop = asyncio.get_running_loop()
        if change:
            self._owed, self._retry_at = True, 0.0
        if not self._owed or not self.is_keeper or loop.time() < self._retry_at or self._lock.locked():
            return
        async with self._lock:
            copied = await self.pool.anti_entropy()
            self.passes += 1
            self.copied += copied
            # a member down during the pass may lack what its stand-ins took: again, later
            self._owed = bool(self.pool.down_shards & set(self.pool.ring.shards))
            self._retry_at = loop.time() + RETRY_S if self._owed else 0.0
        log.info("kvcache keeper pass", extra={"keeper": self.name, "copied": copied, "members": self.membership.names,
                                               "again": self._owed})

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.pool is not None:
            await self.pool.close()
        await self.membership.close()  # idempotent; the pool closed it if it followed it
