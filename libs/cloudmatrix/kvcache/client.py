"""KvPoolClient: the EMS pool as one store, over N kvcache shards placed by consistent hashing.

    async with KvPoolClient(["kvcache-0.kvcache:50051", "kvcache-1.kvcache:50051"]) as pool:
        results = await pool.put_blocks([Block(key, "tiny/fp32", "full", 16, data)])
        hit = await pool.lookup(prefix_keys)          # longest cached prefix, in blocks
        blocks = await pool.get_blocks(prefix_keys[:hit])

No master: every client holding the same shard list computes the same replicas (ring.py).
Writes go to the R ring replicas and are acknowledged at W; reads walk the replicas in ring
order with fallback and read repair (reads.py); liveness and retries are in connections.py and
health.py; blobs in blobs.py.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from google.protobuf.message import Message

from cloudmatrix.kvcache import antientropy, blobs, reads, writes
from cloudmatrix.kvcache.blocks import (
    BlobPutResult,
    Block,
    DeleteResult,
    FetchedBlock,
    Lease,
    PutResult,
)
from cloudmatrix.kvcache.coalesce import PutCoalescer
from cloudmatrix.kvcache.connections import CALL_ERRORS, ShardConnections, describe
from cloudmatrix.kvcache.membership import Change, Membership
from cloudmatrix.kvcache.ring import HashRing
from cloudmatrix.kvcache.shard_client import KvShardClient
from cloudmatrix.rpc.channel import DEFAULT_MAX_MESSAGE_BYTES
from cmx.kvcache.v1 import kvcache_pb2

log = logging.getLogger(__name__)
MESSAGE_OVERHEAD_BYTES = 64 * 1024  # room for a message's non-data fields under the size limit


class KvPoolClient:
    """Client of the kvcache shard pool: blocks, lookups, leases and blobs across replicas.

    Every RPC has a ``deadline_s`` deadline (``blob_deadline_s`` for blob streams) and is retried
    up to ``retries`` times on UNAVAILABLE / DEADLINE_EXCEEDED. ``down_after`` failed attempts in
    a row mark a shard down: it is skipped until a health probe, every ``probe_interval_s``, finds
    it SERVING. Use it from one event loop; ``close()`` (or ``async with``) ends everything.
    """

    def __init__(self, shards: list[str], *, replication: int = 2, write_quorum: int | None = None,
                 deadline_s: float = 5.0, retries: int = 2, down_after: int = 2, probe_interval_s: float = 2.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, vnodes: int = 64, backoff_s: float = 0.05,
                 blob_deadline_s: float = 300.0, elastic: bool = False, repair_on_rejoin: bool = True) -> None:
        write_quorum = replication if write_quorum is None else write_quorum
        if not shards:
            raise ValueError("a pool needs at least one shard")
        if not 1 <= replication <= (replication if elastic else len(shards)):
            raise ValueError(f"replication must be in 1..{len(shards)} (the shard count), got {replication}")
        if not 1 <= write_quorum <= replication:
            raise ValueError(f"write_quorum must be in 1..replication={replication}, got {write_quorum}")
        self.ring = HashRing(shards, vnodes)
        self.replication = replication
        self.write_quorum = write_quorum
        self.blob_deadline_s = blob_deadline_s
        self._conns = ShardConnections(make_client=KvShardClient, deadline_s=deadline_s, retries=retries, backoff_s=backoff_s,
                                       max_message_bytes=max_message_bytes, down_after=down_after,
                                       probe_interval_s=probe_interval_s)
        self._repairs = reads.Repairs(self._conns)
        self._puts = PutCoalescer(lambda blocks, leases: writes.put_blocks(
            self._conns, self._preference, self.replication, blocks, self.quorum, leases))
        self._passes: set[asyncio.Task[int]] = set()
        self._rejoin_copies = 0
        self._follower: asyncio.Task[None] | None = None
        self._conns.on_rejoin = self._rejoined if repair_on_rejoin else None

    async def __aenter__(self) -> KvPoolClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel repairs, anti-entropy passes, probes and the membership follower, close every channel."""
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
            await self._membership.close()
        for task in self._passes:
            task.cancel()
        await asyncio.gather(*self._passes, return_exceptions=True)
        await self._repairs.close()
        await self._puts.close()
        await self._conns.close()

    # -- placement and liveness

    def replicas(self, key: bytes) -> list[str]:
        """The ring replicas of ``key``, primary first (down or not)."""
        return self.ring.replicas(key, self.replication)

    def _preference(self, key: bytes) -> list[str]:
        """Every shard in ring order from ``key``: its replicas, then the stand-ins for down ones."""
        return self.ring.replicas(key, len(self.ring))

    def is_up(self, shard: str) -> bool:
        return self._conns.health.is_up(shard)

    @property
    def down_shards(self) -> set[str]:
        return self._conns.health.down

    def failed_probes(self, shard: str) -> int:
        """Health probes that found ``shard`` still down (since it was first marked down)."""
        return self._conns.health.failed_probes[shard]

    def add_shard(self, shard: str) -> None:
        """Put a shard on the ring; keys now placed on it are misses there until written or repaired."""
        self.ring.add(shard)

    def remove_shard(self, shard: str) -> None:
        self.ring.remove(shard)
        self._conns.health.forget(shard)
        self._conns.reset(shard)

    @property
    def quorum(self) -> int:
        """The write quorum, at most the shards on the ring (an elastic pool may have fewer than R)."""
        return min(self.write_quorum, len(self.ring))

    # -- membership

    def apply(self, change: Change, members: Iterable[str] | None = None) -> None:
        """Members that joined go on the ring, those that left come off it, and with ``members``
        (the whole membership) any shard on the ring that is not a member; never the last one."""
        for shard in change.joined:
            if shard not in self.ring:
                self.add_shard(shard)
        members = set(members) if members else None
        for shard in [*change.left, *(s for s in self.ring.shards if members and s not in members)]:
            if shard in self.ring and len(self.ring) > 1:
                self.remove_shard(shard)

    def follow(self, membership: Membership, interval_s: float,
               on_change: Callable[[Change], Awaitable[None]] | None = None) -> None:
        """Keep the ring on ``membership`` (membership.py), refreshed every ``interval_s`` until
        ``close()``; ``on_change`` runs after each round, its change applied (empty when none)."""
        async def run() -> None:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    change = await membership.refresh()
                    self.apply(change, membership.members)
                    if on_change is not None:
                        await on_change(change)
                except Exception as err:  # a round that fails is retried at the next one
                    log.warning("kvcache membership round failed: %s", err)

        self._membership = membership
        self._follower = asyncio.get_running_loop().create_task(run(), name="kvcache-membership")

    # -- anti-entropy

    async def anti_entropy(self, shards: list[str] | None = None) -> int:
        """Copy every block to each up replica of its key that lacks it (only to ``shards`` when
        given); the number of blocks copied (antientropy.py)."""
        return await antientropy.run_pass(self._conns, self.ring.shards, self.replicas,
                                          set(shards) if shards is not None else None)

    async def drain_anti_entropy(self) -> int:
        """Wait for the passes started by shards coming back; the blocks they copied since the
        last drain."""
        while self._passes:
            await asyncio.gather(*list(self._passes), return_exceptions=True)
        copied, self._rejoin_copies = self._rejoin_copies, 0
        return copied

    def _rejoined(self, shard: str) -> None:
        """A shard that was down is SERVING again (restarted: empty or stale): refill its replicas."""
        task = asyncio.get_running_loop().create_task(self.anti_entropy([shard]))
        self._passes.add(task)
        task.add_done_callback(self._pass_done)

    def _pass_done(self, task: asyncio.Task[int]) -> None:
        self._passes.discard(task)
        if not task.cancelled() and task.exception() is None:
            self._rejoin_copies += task.result()
        elif not task.cancelled():
            log.warning("anti-entropy pass failed: %s", task.exception())

    # -- blocks

    async def put_blocks(self, blocks: list[Block], lease: Lease | None = None) -> list[PutResult]:
        """Store each block on its replicas; one PutResult per block, in order. With ``lease``
        (from ``lookup_and_lease``) each block joins it on the shards that hold a part of it
        (``PutResult.leased_on``). Puts made in the same turn of the event loop share one Put
        stream per shard (coalesce.py)."""
        for block in blocks:
            self._check_size(len(block.data), f"block {block.key.hex()}")
        return await self._puts.put(blocks, lease.lease_ids if lease else {})

    async def get_blocks(self, keys: Iterable[bytes], release: Lease | None = None
                         ) -> dict[bytes, FetchedBlock | None]:
        """Each distinct key -> its checksum-verified block, or None when no up shard has it.
        ``release`` ends once they are read: with the Gets of the shards read from, by Release on
        the others.

        Starts read repairs in the background; ``drain_repairs()`` waits for them.
        """
        pending = dict(release.lease_ids) if release else {}
        # the replicas first, then the other shards in ring order: while the membership changes a
        # block may still sit only on a shard that is no longer its replica (the keeper is moving
        # it); found there, it is written back to the replicas that missed it (read repair)
        found = await reads.get_blocks(self._conns, self._preference, list(keys), self._repairs, pending,
                                       owners=self.replicas)
        if pending:
            await self.release(Lease(pending, (), 0.0))
        return found

    async def drain_repairs(self) -> int:
        """Wait for the read repairs in flight; how many blocks were written back since the last drain."""
        return await self._repairs.drain()

    async def presence(self, keys: list[bytes]) -> list[bool]:
        """Per key: does any up replica hold it? (A replica that fails to answer counts as "no".)"""
        present = [False] * len(keys)
        for _, indexes, reply in await self._fan_out(keys, "Lookup", lambda ks: kvcache_pb2.LookupRequest(keys=ks)):
            if isinstance(reply, kvcache_pb2.LookupReply):
                for i, here in zip(indexes, reply.present):
                    present[i] = present[i] or here
        return present

    async def lookup(self, keys: list[bytes]) -> int:
        """Longest cached prefix of ``keys`` (the chained prefix keys of one prompt), in blocks."""
        present = await self.presence(keys)
        return next((i for i, here in enumerate(present) if not here), len(present))

    async def lookup_and_lease(self, keys: list[bytes], ttl_s: float) -> tuple[list[bool], Lease]:
        """``presence`` and ``lease`` in one call per up replica: per key, does any hold it; and
        a lease on each of them (granted even where none is held) that ``put_blocks`` can extend
        to blocks written later. A prefill's one round trip before its write-back."""
        present, leased, lease_ids, ttls = [False] * len(keys), [False] * len(keys), {}, []
        answers = await self._fan_out(keys, "Lookup",
                                      lambda ks: kvcache_pb2.LookupRequest(keys=ks, lease_ttl_s=ttl_s))
        for shard, indexes, reply in answers:
            if not isinstance(reply, kvcache_pb2.LookupReply):
                continue
            if reply.lease_id:
                lease_ids[shard] = reply.lease_id
                ttls.append(reply.lease_ttl_s)
            for i, here, pinned in zip(indexes, reply.present, reply.leased):
                present[i], leased[i] = present[i] or here, leased[i] or pinned
        return present, Lease(lease_ids, tuple(leased), min(ttls, default=0.0))

    async def lease(self, keys: list[bytes], ttl_s: float) -> Lease:
        """Pin ``keys`` against eviction on every up replica for ``ttl_s``; end it with ``release``."""
        answers = await self._fan_out(keys, "Lease", lambda ks: kvcache_pb2.LeaseRequest(keys=ks, ttl_s=ttl_s))
        leased, lease_ids, ttls = [False] * len(keys), {}, []
        for shard, indexes, reply in answers:
            if isinstance(reply, kvcache_pb2.LeaseReply) and any(reply.leased):
                lease_ids[shard] = reply.lease_id
                ttls.append(reply.ttl_s)
                for i, pinned in zip(indexes, reply.leased):
                    leased[i] = leased[i] or pinned
        return Lease(lease_ids, tuple(leased), min(ttls, default=0.0))

    async def release(self, lease: Lease) -> int:
        """End ``lease`` on every shard it covers; how many shard leases were found and ended."""
        replies = await asyncio.gather(*(self._unary(shard, "Release", kvcache_pb2.ReleaseRequest(lease_ids=[lid]))
                                         for shard, lid in lease.lease_ids.items()))
        return sum(r.released for r in replies if isinstance(r, kvcache_pb2.ReleaseReply))

    async def delete(self, keys: list[bytes]) -> DeleteResult:
        """Delete ``keys`` from every up replica (copies on shards marked down are left alone)."""
        answers = await self._fan_out(keys, "Delete", lambda ks: kvcache_pb2.DeleteRequest(keys=ks))
        ok = [reply for _, _, reply in answers if isinstance(reply, kvcache_pb2.DeleteReply)]
        errors = {shard: reply for shard, _, reply in answers if isinstance(reply, str)}
        return DeleteResult(sum(r.deleted for r in ok), sum(r.missing for r in ok),
                            sum(r.refused_leased for r in ok), errors)

    async def stats(self) -> dict[str, kvcache_pb2.StatsReply | None]:
        """Every shard on the ring -> its StatsReply, or None when it is down or does not answer."""
        shards = self.ring.shards
        replies = await asyncio.gather(*(self._unary(s, "Stats", kvcache_pb2.StatsRequest()) for s in shards))
        return {s: r if isinstance(r, kvcache_pb2.StatsReply) else None for s, r in zip(shards, replies)}

    # -- blobs (model caching)

    async def put_blob(self, name: str, data: bytes, chunk_bytes: int = 4 << 20) -> BlobPutResult:
        """Store ``data`` under ``name`` on the R replicas of the name, in CRC-32-checked chunks."""
        self._check_chunk(chunk_bytes)
        return await blobs.put_blob(self._conns, self._blob_replicas(name), name,
                                    lambda: blobs.chunks_from_bytes(name, data, chunk_bytes), len(data),
                                    self.quorum, self.blob_deadline_s)

    async def put_blob_from_file(self, name: str, path: str | Path, chunk_bytes: int = 4 << 20) -> BlobPutResult:
        """``put_blob`` of a file's contents, read chunk by chunk (never whole in memory)."""
        self._check_chunk(chunk_bytes)
        path = Path(path)
        return await blobs.put_blob(self._conns, self._blob_replicas(name), name,
                                    lambda: blobs.chunks_from_file(name, path, chunk_bytes), path.stat().st_size,
                                    self.quorum, self.blob_deadline_s)

    async def get_blob(self, name: str) -> bytes | None:
        """The blob from the first up replica serving it intact, or None when none does."""
        sink = blobs.BytesSink()
        if not await blobs.get_blob(self._conns, self._blob_replicas(name), name, sink, self.blob_deadline_s):
            return None
        return b"".join(sink.parts)

    async def get_blob_to_file(self, name: str, path: str | Path) -> bool:
        """Stream the blob to ``path`` (via ``<path>.part``); False, and no file, when no replica serves it."""
        sink = blobs.FileSink(Path(path))
        try:
            ok = await blobs.get_blob(self._conns, self._blob_replicas(name), name, sink, self.blob_deadline_s)
        except BaseException:
            sink.discard()
            raise
        if ok:
            sink.commit()
        else:
            sink.discard()
        return ok

    # -- helpers

    def _blob_replicas(self, name: str) -> list[str]:
        return self.replicas(blobs.blob_ring_key(name))

    def _check_chunk(self, chunk_bytes: int) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self._check_size(chunk_bytes, "chunk_bytes")

    def _check_size(self, nbytes: int, what: str) -> None:
        limit = self._conns.max_message_bytes - MESSAGE_OVERHEAD_BYTES
        if nbytes > limit:
            raise ValueError(f"{what} is {nbytes} bytes; one message carries at most {limit} "
                             f"(raise max_message_bytes or split it)")

    async def _fan_out(self, keys: list[bytes], rpc: str, request: Callable[[list[bytes]], Message]
                       ) -> list[tuple[str, list[int], Message | str]]:
        """One unary ``rpc`` per up replica with the keys it holds, all concurrent:
        (shard, indexes of its keys, reply or why there is none)."""
        plan: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            for shard in self._conns.health.up(self.replicas(key)):
                plan.setdefault(shard, []).append(i)
        replies = await asyncio.gather(*(self._unary(shard, rpc, request([keys[i] for i in indexes]))
                                         for shard, indexes in plan.items()))
        return [(shard, indexes, reply) for (shard, indexes), reply in zip(plan.items(), replies)]

    async def _unary(self, shard: str, rpc: str, request: Message) -> Message | str:
        """The reply, or (logged) a string saying why there is none."""
        try:
            return await self._conns.call(
                shard, lambda client, t: client.unary(rpc, request, idempotent=False, deadline_s=t))
        except CALL_ERRORS as err:
            log.warning("kvcache shard %s: %s failed: %s", shard, rpc, describe(err))
            return describe(err)
