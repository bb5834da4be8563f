"""One shard of the Elastic Memory Service pool, free of gRPC: immutable KV blocks in a memory
tier (LRU, capacity in data bytes, leased blocks never evicted) over an optional disk tier, leases,
and named blobs.

Tiers are inclusive: blocks are immutable, so a disk copy never goes stale. With write-through
every stored block is also written to disk before the Put is answered (a SIGKILL loses no
acknowledged block); without it, a block reaches disk when it is evicted (a spill). Evicting a
block that already has a file writes nothing, and a promoted block keeps its file. What
counts as use for the LRU: a Get hit, a Lookup hit, a duplicate Put, a Lease. Every read of a
block verifies its checksum; a corrupt copy is dropped, counted and never served.

Thread-safe: one lock serializes the block operations; blobs have their own lock.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from cloudmatrix.errors import FieldError
from services.kvcache.blobs import BlobChunk, BlobInfo, BlobStore, BlobWriter
from services.kvcache.blocks import Block, PutOutcome, check_keys, validate_block
from services.kvcache.disk import CorruptBlock, DiskTier
from services.kvcache.leases import LeaseTable
from services.kvcache.memory import MemoryTier
from services.kvcache.results import (
    Counters,
    DeleteResult,
    LeaseGrant,
    LookupResult,
    ShardStats,
)

if TYPE_CHECKING:
    from services.kvcache.config import KvCacheConfig

log = logging.getLogger(__name__)


class ShardStore:
    """One shard's blocks, leases and blobs. ``clock`` (seconds) drives lease expiry."""

    def __init__(self, capacity_bytes: int, max_block_bytes: int, *, disk: DiskTier | None = None,
                 write_through: bool = False, blobs: BlobStore | None = None, max_lease_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.memory = MemoryTier(capacity_bytes)
        self.disk = disk
        self.write_through = write_through
        self.blobs = blobs if blobs is not None else BlobStore(None)
        self.leases = LeaseTable(clock)
        self.max_block_bytes = max_block_bytes
        self.max_lease_s = max_lease_s
        self.counters = Counters(checksum_failures=disk.dropped_on_open if disk else 0)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: KvCacheConfig, clock: Callable[[], float] = time.monotonic) -> ShardStore:
        disk = DiskTier(config.disk_dir, config.disk_capacity_bytes, config.disk_fsync) \
            if config.disk_dir is not None else None
        return cls(config.capacity_bytes, config.max_block_bytes, disk=disk,
                   write_through=config.disk_write_through, blobs=BlobStore(config.resolved_blob_dir), max_lease_s=config.max_lease_s, clock=clock)

    def put(self, key: bytes, namespace: str, kind: int, num_tokens: int, data: bytes,
            checksum: int) -> PutOutcome:
        """Store one block. Invalid input raises ValueError naming the field (and is counted
        as rejected); otherwise STORED, DUPLICATE, CONFLICT or CAPACITY."""
        return self.put_leased(key, namespace, kind, num_tokens, data, checksum, "")[0]

    def put_leased(self, key: bytes, namespace: str, kind: int, num_tokens: int, data: bytes,
                   checksum: int, lease_id: str) -> tuple[PutOutcome, bool]:
        """``put``, and then (under the same lock, so nothing evicts it in between) the stored
        block, or the version already stored, joins lease ``lease_id`` when that one is unexpired:
        (outcome, whether it joined)."""
        block = Block(key, namespace, kind, num_tokens, data, checksum)
        try:
            validate_block(block, self.max_block_bytes)
        except ValueError:
            with self._lock:
                self.counters.rejected += 1
            raise
        with self._lock:
            outcome = self._put(block)
            held = outcome is not PutOutcome.CAPACITY
            return outcome, bool(lease_id) and held and self.leases.join(lease_id, key)

    def get(self, keys: Sequence[bytes], release: Iterable[str] = ()) -> list[Block | None]:
        """Each key's verified block (None: a miss). Disk hits are promoted to memory if they fit.
        The leases in ``release`` end once the blocks are read."""
        check_keys(keys)
        with self._lock:
            found = [self._fetch(key, promote=True) for key in keys]
            hits = sum(block is not None for block in found)
            self.counters.hits += hits
            self.counters.misses += len(found) - hits
            self.leases.release(release)
            return found

    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """Which keys are present (no data read, so no checksum check); hits count as use."""
        check_keys(keys)
        with self._lock:
            present = [self._touch(key) for key in keys]
        return _lookup_result(present)

    def lookup_and_lease(self, keys: Sequence[bytes], ttl_s: float) -> tuple[LookupResult, LeaseGrant]:
        """``lookup``, and the present keys leased as ``lease`` leases them, in one step, under a
        lease granted even when none is present (later Puts join it)."""
        check_keys(keys)
        granted = self._lease_ttl(ttl_s, "lease_ttl_s")
        with self._lock:
            present = [self._touch(key) for key in keys]
            return _lookup_result(present), self._lease(keys, granted, always=True)

    def keys_after(self, after: bytes, limit: int) -> tuple[list[bytes], bool]:
        """Up to ``limit`` held keys greater than ``after``, ascending, and whether more follow."""
        with self._lock:
            held = set(self.memory.blocks) | (set(self.disk.index) if self.disk is not None else set())
        page = sorted(k for k in held if k > after)
        return page[:limit], len(page) > limit

    def lease(self, keys: Sequence[bytes], ttl_s: float) -> LeaseGrant:
        """Pin the present keys in memory (disk-only ones are promoted first) for
        min(ttl_s, max_lease_s) seconds."""
        check_keys(keys)
        granted = self._lease_ttl(ttl_s, "ttl_s")
        with self._lock:
            return self._lease(keys, granted, always=False)

    def _lease_ttl(self, ttl_s: float, field: str) -> float:
        if not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise FieldError(field, f"must be a finite number > 0, got {ttl_s}")
        return min(ttl_s, self.max_lease_s)

    def _lease(self, keys: Sequence[bytes], granted: float, always: bool) -> LeaseGrant:
        """Under the lock: pin the present keys (``always``: grant a lease even over none)."""
        held = {key for key in keys if key in self.memory.blocks}
        for key in dict.fromkeys(keys):
            if key in held:
                self.memory.touch(key)
            elif self._promote(key, protect=frozenset(held)):
                held.add(key)
        lease_id = self.leases.grant(held, granted) if held or always else ""
        return LeaseGrant(lease_id, [key in held for key in keys], granted)

    def release(self, lease_ids: Iterable[str]) -> int:
        """End leases; returns how many were found unexpired."""
        with self._lock:
            return self.leases.release(lease_ids)

    def delete(self, keys: Sequence[bytes]) -> DeleteResult:
        """Remove blocks from both tiers; leased blocks stay and are counted as refused."""
        check_keys(keys)
        deleted = missing = refused = 0
        with self._lock:
            pinned = self.leases.pinned()
            for key in keys:
                if key in pinned and key in self.memory.blocks:
                    refused += 1
                    continue
                removed = self.memory.pop(key) is not None
                removed = (self.disk is not None and self.disk.remove(key)) or removed
                deleted, missing = deleted + removed, missing + (not removed)
        return DeleteResult(deleted, missing, refused)

    def stats(self) -> ShardStats:
        blobs, blob_bytes, blob_failures = self.blobs.stats()
        with self._lock:
            pinned = self.leases.pinned()
            counters = dataclasses.replace(self.counters)
            counters.checksum_failures += blob_failures
            return ShardStats(
                **dataclasses.asdict(counters),
                blocks=len(self.memory.blocks), used_bytes=self.memory.used_bytes,
                capacity_bytes=self.memory.capacity_bytes,
                leased_blocks=sum(key in self.memory.blocks for key in pinned),
                disk_blocks=len(self.disk.index) if self.disk else 0,
                disk_bytes=self.disk.used_bytes if self.disk else 0,
                disk_capacity_bytes=self.disk.capacity_bytes if self.disk else 0,
                blobs=blobs, blob_bytes=blob_bytes)

    def blob_writer(self, name: str) -> BlobWriter:
        """A writer that takes a blob's chunks one at a time (see BlobWriter)."""
        return self.blobs.writer(name)

    def put_blob(self, name: str, chunks: Iterable[BlobChunk]) -> BlobInfo:
        return self.blobs.put_blob(name, chunks)

    def get_blob(self, name: str, chunk_bytes: int) -> Iterator[BlobChunk]:
        """Chunks of a complete blob; BlobNotFound (a KeyError) for an unknown or damaged one."""
        return self.blobs.get_blob(name, chunk_bytes)

    def _put(self, block: Block) -> PutOutcome:
        existing = self._fetch(block.key, promote=False)
        if existing == block:
            self.counters.duplicates += 1
            return PutOutcome.DUPLICATE
        if existing is not None:
            self.counters.conflicts += 1
            self.counters.rejected += 1
            return PutOutcome.CONFLICT
        if not self._admit(block):
            self.counters.rejected += 1
            return PutOutcome.CAPACITY
        if self.write_through and self.disk is not None:
            self._write_disk(block, "write-through")
        self.counters.stored += 1
        return PutOutcome.STORED

    def _fetch(self, key: bytes, promote: bool) -> Block | None:
        """The verified block from memory, else from disk (then promoted if asked and it fits)."""
        block = self.memory.blocks.get(key)
        if block is not None:
            if block.intact():
                self.memory.touch(key)
                return block
            self.memory.pop(key)
            self._count_corrupt(key, "memory copy does not match its checksum")
        block = self._read_disk(key)
        if block is not None and promote and self._admit(block):
            self.counters.promotions += 1
        return block

    def _promote(self, key: bytes, protect: frozenset[bytes]) -> bool:
        block = self._read_disk(key)
        if block is None or not self._admit(block, protect):
            return False
        self.counters.promotions += 1
        return True

    def _read_disk(self, key: bytes) -> Block | None:
        if self.disk is None or key not in self.disk:
            return None
        try:
            block = self.disk.read(key)
        except CorruptBlock as err:
            self._count_corrupt(key, f"disk file: {err}")
            return None
        if block is not None:
            self.disk.touch(key)
        return block

    def _touch(self, key: bytes) -> bool:
        hit = False
        if key in self.memory.blocks:
            self.memory.touch(key)
            hit = True
        if self.disk is not None and key in self.disk:
            self.disk.touch(key)
            hit = True
        return hit

    def _admit(self, block: Block, protect: frozenset[bytes] = frozenset()) -> bool:
        """Put ``block`` in memory as the most recently used, evicting LRU unpinned blocks."""
        victims = self.memory.victims(len(block.data), self.leases.pinned() | protect)
        if victims is None:
            return False
        for key in victims:
            self._evict(key)
        self.memory.add(block)
        return True

    def _evict(self, key: bytes) -> None:
        block = self.memory.pop(key)
        self.counters.evictions += 1
        if self.disk is not None and key not in self.disk and self._write_disk(block, "spill"):
            self.counters.spills += 1

    def _write_disk(self, block: Block, why: str) -> bool:
        """Write ``block``'s file; False (logged) when it is larger than the tier or the write fails."""
        try:
            return self.disk.write(block)
        except OSError as err:
            log.warning("writing a block to the disk tier failed", extra={"key": block.key.hex(), "why": why,
                                                                          "error": str(err)})
            return False

    def _count_corrupt(self, key: bytes, why: str) -> None:
        self.counters.checksum_failures += 1
        log.warning("corrupt block dropped", extra={"key": key.hex(), "why": why})


def _lookup_result(present: list[bool]) -> LookupResult:
    return LookupResult(present, next((i for i, hit in enumerate(present) if not hit), len(present)))
