"""Consistent hashing with virtual nodes: which shards hold a key, with no metadata master.

Every shard is placed on a 64-bit ring at ``vnodes`` points, point i being the first 8 bytes
(big-endian) of ``blake2b(f"{shard}#{i}")``; a key sits at the first 8 bytes of
``blake2b(key)``. The replicas of a key are the first r distinct shards met walking clockwise
from the key's point. Shards are named by their address ("host:port", in Kubernetes a stable
DNS name such as "kvcache-0.kvcache:50051"): the ring hashes the name, so every process given
the same shard list computes the same placement, across processes, hosts and Python versions
(blake2b is byte-level and unseeded, unlike ``hash()``).

Adding a shard moves only the keys whose walk now meets the new shard first (about 1/N of
primaries); keys whose replicas do not include the new shard keep exactly their replicas.
"""
from __future__ import annotations

import bisect
import hashlib

_POINT_BYTES = 8


def ring_point(data: bytes) -> int:
    """The 64-bit ring position of ``data``: first 8 bytes of blake2b, big-endian."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=_POINT_BYTES).digest(), "big")


class HashRing:
    """Shards on a hash ring at ``vnodes`` points each; ``replicas`` walks it clockwise."""

    def __init__(self, shards: list[str], vnodes: int = 64) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.vnodes = vnodes
        self._points: list[tuple[int, str]] = []  # sorted by (point, shard): ties break by name
        self._shards: list[str] = []
        for shard in shards:
            self.add(shard)

    @property
    def shards(self) -> list[str]:
        """The shards on the ring, in the order they were added."""
        return list(self._shards)

    def __len__(self) -> int:
        return len(self._shards)

    def __contains__(self, shard: object) -> bool:
        return shard in self._shards

    def add(self, shard: str) -> None:
        if not shard:
            raise ValueError("a shard needs a non-empty address such as 'kvcache-0.kvcache:50051'")
        if shard in self._shards:
            raise ValueError(f"shard {shard!r} is already on the ring")
        self._shards.append(shard)
        for point in self._shard_points(shard):
            bisect.insort(self._points, (point, shard))

    def remove(self, shard: str) -> None:
        if shard not in self._shards:
            raise ValueError(f"shard {shard!r} is not on the ring (shards: {self._shards})")
        self._shards.remove(shard)
        self._points = [p for p in self._points if p[1] != shard]

    def replicas(self, key: bytes, r: int) -> list[str]:
        """The first ``r`` distinct shards clockwise from ``key``'s point, primary first.

        Fewer than ``r`` when the ring has fewer shards; empty for an empty ring.
        """
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        wanted = min(r, len(self._shards))
        found: list[str] = []
        start = bisect.bisect_left(self._points, (ring_point(key), ""))
        for offset in range(len(self._points)):
            shard = self._points[(start + offset) % len(self._points)][1]
            if shard not in found:
                found.append(shard)
                if len(found) == wanted:
                    break
        return found

    def primary(self, key: bytes) -> str:
        """The first replica of ``key``."""
        if not self._shards:
            raise ValueError("the ring has no shards")
        return self.replicas(key, 1)[0]

    def _shard_points(self, shard: str) -> list[int]:
        return [ring_point(f"{shard}#{i}".encode()) for i in range(self.vnodes)]
