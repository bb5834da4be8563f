"""KvShardClient: one kvcache shard. ``KvPoolClient`` (cloudmatrix.kvcache) is the pool over
many, with replication, read repair and liveness; it makes every call through this client.

    async with KvShardClient("127.0.0.1:50080") as shard:
        await shard.put_blocks([Block(key, "tiny/fp32", "full", 16, data)])
        found = await shard.get_blocks([key])        # key -> FetchedBlock, or None
        print((await shard.stats())["blocks"])

Puts and Gets travel as serialized messages (``Block.to_wire``, raw ``GetReply`` bytes): a
block's data is not copied through message objects.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from google.protobuf import json_format

from cloudmatrix.kvcache.blobs import BytesSink, chunks_from_bytes, read_blob
from cloudmatrix.kvcache.blocks import Block, FetchedBlock
from cloudmatrix.kvcache.reads import WireReply, decode_reply
from cloudmatrix.rpc.client import ServiceClient
from cmx.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc

PUT_METHOD = "/cmx.kvcache.v1.KvCacheShard/Put"
GET_METHOD = "/cmx.kvcache.v1.KvCacheShard/Get"
BLOB_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class KeyOutcome:
    key: bytes
    status: str                          # "stored", "duplicate", "rejected_checksum", ...
    message: str = ""

    @property
    def acknowledged(self) -> bool:
        return self.status in ("stored", "duplicate")


@dataclasses.dataclass(frozen=True)
class ShardLease:
    lease_id: str
    leased: list[bool]                   # one per key: False when the key is not stored
    ttl_s: float


IDENTITY = ("name", "boot_id")  # the StatsReply fields that are not counters


class KvShardClient(ServiceClient):
    SERVICE = "cmx.kvcache.v1.KvCacheShard"
    STUB = kvcache_pb2_grpc.KvCacheShardStub

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stub.PutSerialized = self.channel.stream_unary(PUT_METHOD,
                                                            response_deserializer=kvcache_pb2.PutReply.FromString)
        self.stub.GetSerialized = self.channel.unary_stream(GET_METHOD,
                                                            request_serializer=kvcache_pb2.GetRequest.SerializeToString)

    # -- blocks

    async def put_wire(self, messages: list[bytes], deadline_s: float | None = None) -> kvcache_pb2.PutReply:
        """One Put stream of serialized PutBlock messages (blocks are immutable: idempotent)."""
        return await self.unary("PutSerialized", messages, idempotent=True, deadline_s=deadline_s)

    async def put_blocks(self, blocks: list[Block], deadline_s: float | None = None) -> list[KeyOutcome]:
        reply = await self.put_wire([b.to_wire() for b in blocks], deadline_s)
        return [KeyOutcome(s.key, kvcache_pb2.PutStatus.Name(s.status).removeprefix("PUT_STATUS_").lower(), s.message)
                for s in reply.statuses]

    async def get_wire(self, keys: list[bytes], deadline_s: float | None = None,
                       release_lease_ids: Sequence[str] = ()) -> list[bytes]:
        """The serialized GetReply of each key (``reads.WireReply.parse`` reads them); the shard
        ends the leases ``release_lease_ids`` once it has read the blocks."""
        request = kvcache_pb2.GetRequest(keys=keys, release_lease_ids=release_lease_ids)
        stream = self.stream("GetSerialized", request, deadline_s)
        return [raw async for raw in stream]

    async def get_blocks(self, keys: list[bytes], deadline_s: float | None = None) -> dict[bytes, FetchedBlock | None]:
        """key -> the block (its CRC-32 checked), or None when the shard does not hold it intact."""
        found: dict[bytes, FetchedBlock | None] = dict.fromkeys(keys)
        for raw in await self.get_wire(keys, deadline_s):
            reply = WireReply.parse(raw)
            if reply.key in found:  # a corrupt or malformed copy stays None (logged by decode_reply)
                found.update(decode_reply(reply, self.address))
        return found

    async def lookup_and_lease(self, keys: list[bytes], ttl_s: float, deadline_s: float | None = None
                               ) -> tuple[list[bool], ShardLease]:
        """Which keys the shard holds, and a lease over them for ``ttl_s`` that later Puts can
        join (granted even when it holds none); not retried."""
        reply = await self.unary("Lookup", kvcache_pb2.LookupRequest(keys=keys, lease_ttl_s=ttl_s), idempotent=False,
                                 deadline_s=deadline_s)
        return list(reply.present), ShardLease(reply.lease_id, list(reply.leased), reply.lease_ttl_s)

    async def lookup(self, keys: list[bytes], deadline_s: float | None = None) -> tuple[list[bool], int]:
        """Which keys the shard holds, and how many leading keys it holds all of."""
        reply = await self.unary("Lookup", kvcache_pb2.LookupRequest(keys=keys), idempotent=True,
                                 deadline_s=deadline_s)
        return list(reply.present), reply.longest_prefix

    async def lease(self, keys: list[bytes], ttl_s: float, deadline_s: float | None = None) -> ShardLease:
        """Pin the keys against eviction for ``ttl_s`` (until released); not retried."""
        reply = await self.unary("Lease", kvcache_pb2.LeaseRequest(keys=keys, ttl_s=ttl_s), idempotent=False,
                                 deadline_s=deadline_s)
        return ShardLease(reply.lease_id, list(reply.leased), reply.ttl_s)

    async def release(self, lease_ids: list[str], deadline_s: float | None = None) -> int:
        reply = await self.unary("Release", kvcache_pb2.ReleaseRequest(lease_ids=lease_ids), idempotent=True,
                                 deadline_s=deadline_s)
        return reply.released

    async def delete(self, keys: list[bytes], deadline_s: float | None = None) -> dict[str, int]:
        """Counts: deleted, missing, refused_leased (idempotent)."""
        reply = await self.unary("Delete", kvcache_pb2.DeleteRequest(keys=keys), idempotent=True,
                                 deadline_s=deadline_s)
        return {"deleted": reply.deleted, "missing": reply.missing, "refused_leased": reply.refused_leased}

    async def list_keys(self, after: bytes = b"", limit: int = 1000,
                        deadline_s: float | None = None) -> tuple[list[bytes], bool]:
        """A page of the keys the shard holds after ``after`` (ascending), and whether more follow."""
        reply = await self.unary("ListKeys", kvcache_pb2.ListKeysRequest(after=after, limit=limit), idempotent=True,
                                 deadline_s=deadline_s)
        return list(reply.keys), reply.more

    async def all_keys(self, page: int = 1000) -> list[bytes]:
        """Every key the shard holds, page by page."""
        keys, after, more = [], b"", True
        while more:
            batch, more = await self.list_keys(after, page)
            keys += batch
            after = batch[-1] if batch else after
            more = more and bool(batch)
        return keys

    async def stats(self, deadline_s: float | None = None) -> dict[str, int]:
        """Every counter of the shard (blocks, used_bytes, hits, misses, evictions, ...)."""
        reply = await self.unary("Stats", kvcache_pb2.StatsRequest(), idempotent=True, deadline_s=deadline_s)
        return {k: int(v) for k, v in json_format.MessageToDict(
            reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True).items()
            if k not in IDENTITY}

    async def identity(self, deadline_s: float | None = None) -> tuple[str, str]:
        """The shard's name on the ring (its advertised address) and its boot id (new at every start)."""
        reply = await self.unary("Stats", kvcache_pb2.StatsRequest(), idempotent=True, deadline_s=deadline_s)
        return reply.name, reply.boot_id

    # -- blobs

    async def put_blob(self, name: str, data: bytes, chunk_bytes: int = BLOB_CHUNK_BYTES,
                       deadline_s: float | None = None) -> int:
        """Store ``data`` under ``name`` in CRC-checked chunks; the bytes the shard stored."""
        reply = await self.unary("PutBlob", chunks_from_bytes(name, data, chunk_bytes), idempotent=False,
                                 deadline_s=deadline_s)
        return reply.bytes

    async def get_blob(self, name: str, deadline_s: float | None = None) -> bytes:
        """The blob, every chunk's CRC, order and the total size checked (``CorruptBlob`` if not)."""
        sink = BytesSink()
        await read_blob(self, deadline_s or self.options.deadline_s, name, sink)
        return b"".join(sink.parts)
