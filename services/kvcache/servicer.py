"""gRPC servicer of one kvcache shard: protos <-> the store, errors -> status codes.

Put validates each block as it arrives. A malformed block (key not 16 bytes, checksum not the
CRC-32 of data, data over max_block_bytes or not a consistent Tensor, unknown kind, num_tokens 0)
aborts the RPC with INVALID_ARGUMENT naming the block index and the field; the blocks before it
in the stream stay stored (blocks are immutable and a re-Put is an idempotent DUPLICATE, so a
client simply retries the whole stream after fixing the block).
"""
from __future__ import annotations

import asyncio
import uuid

import grpc

from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.errors import map_errors
from cloudmatrix.rpc.protowire import field_header
from cloudmatrix.rpc.server import with_raw_bytes
from cmx.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from services.kvcache.blobs import BlobChunk, BlobNotFound
from services.kvcache.blocks import PutOutcome
from services.kvcache.store import ShardStore

BLOB_CHUNK_BYTES = 1 << 20

_GET_REPLY_DATA = kvcache_pb2.GetReply.DESCRIPTOR.fields_by_name["data"].number
_PUT_STATUS = {
    PutOutcome.STORED: (kvcache_pb2.PUT_STATUS_STORED, ""),
    PutOutcome.DUPLICATE: (kvcache_pb2.PUT_STATUS_DUPLICATE, ""),
    PutOutcome.CONFLICT: (kvcache_pb2.PUT_STATUS_REJECTED_CONFLICT,
                          "key already stored with different bytes; blocks are immutable"),
    PutOutcome.CAPACITY: (kvcache_pb2.PUT_STATUS_REJECTED_CAPACITY,
                          "no room even after evicting every unleased block"),
}


# Blocks stored per thread hop in Put: large enough to amortise the hop, small enough that a
# malformed block is still reported promptly.
PUT_BATCH_BYTES = 8 * 2**20


MAX_LIST_KEYS = 10_000


class KvCacheServicer(kvcache_pb2_grpc.KvCacheShardServicer):
    def __init__(self, store: ShardStore, blob_chunk_bytes: int = BLOB_CHUNK_BYTES, name: str = "") -> None:
        self.store = store
        self.blob_chunk_bytes = blob_chunk_bytes
        self.name = name                  # on the ring; set once the bound address is known if ""
        self.boot_id = uuid.uuid4().hex   # a restarted shard is a new boot

    @map_errors
    async def Put(self, request_iterator, context):
        statuses: list[kvcache_pb2.KeyStatus] = []
        batch: list = []
        pending = 0
        async for block in request_iterator:
            batch.append(block)
            pending += len(block.data)
            if pending >= PUT_BATCH_BYTES:  # one thread hop per batch, not per block
                statuses += await asyncio.to_thread(self._put_batch, batch, len(statuses))
                batch, pending = [], 0
        if batch:
            statuses += await asyncio.to_thread(self._put_batch, batch, len(statuses))
        count = [s.status for s in statuses].count
        return kvcache_pb2.PutReply(
            stored=count(kvcache_pb2.PUT_STATUS_STORED), duplicates=count(kvcache_pb2.PUT_STATUS_DUPLICATE),
            rejected=len(statuses) - count(kvcache_pb2.PUT_STATUS_STORED) - count(kvcache_pb2.PUT_STATUS_DUPLICATE),
            statuses=statuses)

    def _put_batch(self, blocks: list, first_index: int) -> list[kvcache_pb2.KeyStatus]:
        """Store blocks in stream order; a malformed one raises, naming its index (earlier ones stay)."""
        statuses = []
        for i, block in enumerate(blocks, start=first_index):
            try:
                outcome, leased = self.store.put_leased(block.key, block.namespace, block.kind, block.num_tokens,
                                                        block.data, block.checksum, block.lease_id)
            except FieldError as err:
                raise FieldError(f"blocks[{i}].{err.field}", f"(key {block.key.hex()}) "
                                 f"{str(err).removeprefix(err.field + ': ')}") from err
            status, message = _PUT_STATUS[outcome]
            statuses.append(kvcache_pb2.KeyStatus(key=block.key, status=status, message=message, leased=leased))
        return statuses

    @map_errors
    async def Get(self, request, context):
        keys = list(request.keys)
        blocks = await asyncio.to_thread(self.store.get, keys, list(request.release_lease_ids))
        for key, block in zip(keys, blocks):  # serialized here: registered with raw responses
            if block is None:
                yield kvcache_pb2.GetReply(key=key, found=False).SerializeToString()
            else:
                head = kvcache_pb2.GetReply(key=key, found=True, checksum=block.checksum, kind=block.kind,
                                            num_tokens=block.num_tokens, namespace=block.namespace)
                yield b"".join((head.SerializeToString(), field_header(_GET_REPLY_DATA, len(block.data)), block.data))

    @map_errors
    async def Lookup(self, request, context):
        if request.lease_ttl_s == 0:
            result = await asyncio.to_thread(self.store.lookup, list(request.keys))
            return kvcache_pb2.LookupReply(present=result.present, longest_prefix=result.longest_prefix)
        result, grant = await asyncio.to_thread(self.store.lookup_and_lease, list(request.keys), request.lease_ttl_s)
        return kvcache_pb2.LookupReply(present=result.present, longest_prefix=result.longest_prefix,
                                       lease_id=grant.lease_id, leased=grant.leased, lease_ttl_s=grant.ttl_s)

    @map_errors
    async def Lease(self, request, context):
        grant = await asyncio.to_thread(self.store.lease, list(request.keys), request.ttl_s)
        return kvcache_pb2.LeaseReply(lease_id=grant.lease_id, leased=grant.leased, ttl_s=grant.ttl_s)

    @map_errors
    async def Release(self, request, context):
        released = await asyncio.to_thread(self.store.release, list(request.lease_ids))
        return kvcache_pb2.ReleaseReply(released=released)

    @map_errors
    async def Delete(self, request, context):
        result = await asyncio.to_thread(self.store.delete, list(request.keys))
        return kvcache_pb2.DeleteReply(deleted=result.deleted, missing=result.missing,
                                       refused_leased=result.refused_leased)

    @map_errors
    async def Stats(self, request, context):
        s = await asyncio.to_thread(self.store.stats)
        counters = {name: getattr(s, name) for name in kvcache_pb2.StatsReply.DESCRIPTOR.fields_by_name
                    if name not in ("name", "boot_id")}
        return kvcache_pb2.StatsReply(**counters, name=self.name, boot_id=self.boot_id)

    @map_errors
    async def ListKeys(self, request, context):
        limit = request.limit or 1000
        if not 1 <= limit <= MAX_LIST_KEYS:
            raise FieldError("limit", f"must be in 1..{MAX_LIST_KEYS}, got {request.limit}")
        keys, more = await asyncio.to_thread(self.store.keys_after, request.after, limit)
        return kvcache_pb2.ListKeysReply(keys=keys, more=more)

    @map_errors
    async def PutBlob(self, request_iterator, context):
        writer = None
        try:
            async for chunk in request_iterator:
                if writer is None:
                    writer = await asyncio.to_thread(self.store.blob_writer, chunk.name)
                await asyncio.to_thread(writer.add, BlobChunk(chunk.name, chunk.chunk_index, chunk.data,
                                                              chunk.checksum, chunk.last, chunk.total_bytes))
            if writer is None:
                raise FieldError("name", "the PutBlob stream carried no chunks")
            info = await asyncio.to_thread(writer.finish)
        finally:
            if writer is not None:
                writer.abort()
        return kvcache_pb2.PutBlobReply(name=info.name, bytes=info.bytes, chunks=info.chunks)

    @map_errors
    async def GetBlob(self, request, context):
        try:
            chunks = await asyncio.to_thread(self.store.get_blob, request.name, self.blob_chunk_bytes)
        except BlobNotFound as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        try:
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield kvcache_pb2.BlobChunk(name=chunk.name, chunk_index=chunk.chunk_index, data=chunk.data,
                                            checksum=chunk.checksum, last=chunk.last,
                                            total_bytes=chunk.total_bytes)
        finally:
            chunks.close()


# Get answers are written on the wire: the block's data is appended once, not copied into a
# GetReply and out again. Clients see ordinary GetReply messages.
add_to_server = with_raw_bytes(kvcache_pb2_grpc.add_KvCacheShardServicer_to_server, responses=["Get"])
