"""Leases: pins that keep blocks in the memory tier for a while (e.g. while a decode instance
loads them). A block is pinned while any unexpired lease covers it. Expiry is lazy: every call
first drops the leases whose time has come, by the injected clock."""
from __future__ import annotations

import dataclasses
import heapq
import uuid
from collections import Counter
from collections.abc import Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Lease:
    lease_id: str
    keys: frozenset[bytes]
    expires_at: float  # clock() value


class LeaseTable:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._leases: dict[str, Lease] = {}
        self._expiry: list[tuple[float, str]] = []  # heap; entries of released leases go stale
        self._pins: Counter[bytes] = Counter()      # key -> unexpired leases covering it

    def grant(self, keys: Iterable[bytes], ttl_s: float) -> str:
        """A new lease over ``keys`` for ``ttl_s`` seconds; returns its id."""
        self._expire()
        lease = Lease(uuid.uuid4().hex, frozenset(keys), self.clock() + ttl_s)
        self._leases[lease.lease_id] = lease
        heapq.heappush(self._expiry, (lease.expires_at, lease.lease_id))
        self._pins.update(lease.keys)
        return lease.lease_id

    def join(self, lease_id: str, key: bytes) -> bool:
        """Add ``key`` to an unexpired lease (its expiry unchanged); False when there is none."""
        self._expire()
        lease = self._leases.get(lease_id)
        if lease is None:
            return False
        if key not in lease.keys:
            self._leases[lease_id] = dataclasses.replace(lease, keys=lease.keys | {key})
            self._pins[key] += 1
        return True

    def release(self, lease_ids: Iterable[str]) -> int:
        """End the given leases; returns how many were found unexpired."""
        self._expire()
        return sum(self._end(lease_id) for lease_id in set(lease_ids))

    def pinned(self) -> frozenset[bytes]:
        """Keys covered by at least one unexpired lease."""
        self._expire()
        return frozenset(self._pins)

    def is_pinned(self, key: bytes) -> bool:
        self._expire()
        return key in self._pins

    def __len__(self) -> int:
        self._expire()
        return len(self._leases)

    def _expire(self) -> None:
        now = self.clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, lease_id = heapq.heappop(self._expiry)
            self._end(lease_id)

    def _end(self, lease_id: str) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._pins.subtract(lease.keys)
        for key in lease.keys:
            if self._pins[key] <= 0:
                del self._pins[key]
        return True
