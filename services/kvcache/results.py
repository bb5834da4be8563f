"""What the shard's store returns: small records at the core's boundary."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple


class LookupResult(NamedTuple):
    present: list[bool]   # one per key, memory or disk
    longest_prefix: int   # leading keys that are all present


class LeaseGrant(NamedTuple):
    lease_id: str         # "" when no key was present (lookup_and_lease: always set)
    leased: list[bool]    # one per key
    ttl_s: float          # granted, capped at max_lease_s


class DeleteResult(NamedTuple):
    deleted: int
    missing: int
    refused_leased: int


@dataclasses.dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0           # invalid blocks, conflicts and capacity rejections
    evictions: int = 0
    checksum_failures: int = 0  # corrupt copies found on read (blocks; blobs are added in stats)
    conflicts: int = 0
    promotions: int = 0
    spills: int = 0             # blocks written to disk on eviction (not write-through writes)


@dataclasses.dataclass(frozen=True)
class ShardStats:
    """Everything StatsReply carries, plus the disk tier's capacity."""

    hits: int
    misses: int
    stored: int
    duplicates: int
    rejected: int
    evictions: int
    checksum_failures: int  # blocks and blobs
    conflicts: int
    promotions: int
    spills: int
    blocks: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0
    leased_blocks: int = 0
    disk_blocks: int = 0
    disk_bytes: int = 0
    disk_capacity_bytes: int = 0
    blobs: int = 0
    blob_bytes: int = 0
