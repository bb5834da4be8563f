"""Named blobs (model caching): chunked PutBlob to the replicas, checksum-verified GetBlob with fallback.

A blob's replicas are the ring replicas of ``blob_ring_key(name)``. Chunks carry their own
CRC-32; a reader checks every chunk, the chunk order and the total size, and falls back to the
next replica on any mismatch. Files stream chunk by chunk in both directions: neither side holds
the whole blob in memory, and a download lands under ``<path>.part`` until complete.
"""
from __future__ import annotations

import asyncio
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from cloudmatrix.kvcache.blocks import BlobPutResult
from cloudmatrix.kvcache.connections import CALL_ERRORS, ShardConnections, describe
from cmx.kvcache.v1 import kvcache_pb2

log = logging.getLogger(__name__)

Chunks = Callable[[], Iterator[kvcache_pb2.BlobChunk]]  # a fresh chunk stream per replica and attempt


class CorruptBlob(Exception):
    """A replica served a blob whose chunks fail their checksum, order or size."""


def blob_ring_key(name: str) -> bytes:
    """Where ``name`` sits on the ring; the prefix keeps blob names apart from block digests."""
    if not name:
        raise ValueError("a blob needs a non-empty name")
    return b"blob:" + name.encode()


def _chunk(name: str, index: int, data: bytes, last: bool, total_bytes: int) -> kvcache_pb2.BlobChunk:
    return kvcache_pb2.BlobChunk(name=name, chunk_index=index, data=data, checksum=zlib.crc32(data), last=last,
                                 total_bytes=total_bytes if index == 0 else 0)


def chunks_from_bytes(name: str, data: bytes, chunk_bytes: int) -> Iterator[kvcache_pb2.BlobChunk]:
    view = memoryview(data)
    starts = range(0, max(len(data), 1), chunk_bytes)
    for index, start in enumerate(starts):
        piece = bytes(view[start:start + chunk_bytes])
        yield _chunk(name, index, piece, index == len(starts) - 1, len(data))


def chunks_from_file(name: str, path: Path, chunk_bytes: int) -> Iterator[kvcache_pb2.BlobChunk]:
    total = path.stat().st_size
    with open(path, "rb") as f:
        piece, index = f.read(chunk_bytes), 0
        while True:
            following = f.read(chunk_bytes)
            yield _chunk(name, index, piece, not following, total)
            if not following:
                return
            piece, index = following, index + 1


async def put_blob(conns: ShardConnections, replicas: list[str], name: str, chunks: Chunks, total_bytes: int,
                   write_quorum: int, deadline_s: float) -> BlobPutResult:
    """Stream the blob to every up replica concurrently; acknowledged once ``write_quorum`` stored it."""
    up = conns.health.up(replicas)
    errors = {s: "shard marked down" for s in replicas if s not in up}
    outcomes = await asyncio.gather(*(_put_on(conns, s, chunks, total_bytes, deadline_s) for s in up))
    errors.update({s: e for s, e in zip(up, outcomes) if e is not None})
    stored = tuple(s for s, e in zip(up, outcomes) if e is None)
    return BlobPutResult(name, len(stored) >= write_quorum, tuple(replicas), stored, errors)


async def _put_on(conns: ShardConnections, shard: str, chunks: Chunks, total_bytes: int,
                  deadline_s: float) -> str | None:
    """None when ``shard`` stored the whole blob, else why not."""
    try:
        reply = await conns.call(shard, lambda client, t: client.unary("PutBlob", chunks(), idempotent=False,
                                                                       deadline_s=t), deadline_s)
    except CALL_ERRORS as err:
        return describe(err)
    if reply.bytes != total_bytes:
        return f"shard stored {reply.bytes} bytes of {total_bytes}"
    return None


class BytesSink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def reset(self) -> None:
        self.parts = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)


class FileSink:
    """Writes to ``<path>.part``; ``commit`` renames it to ``path``, ``discard`` removes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self._file = None

    def reset(self) -> None:
        self.close()
        self._file = open(self.part, "wb")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def commit(self) -> None:
        self.close()
        os.replace(self.part, self.path)

    def discard(self) -> None:
        self.close()
        self.part.unlink(missing_ok=True)


async def get_blob(conns: ShardConnections, replicas: list[str], name: str, sink: BytesSink | FileSink,
                   deadline_s: float) -> bool:
    """Read the blob into ``sink`` from the first up replica that serves it intact; False if none does."""
    for shard in conns.health.up(replicas):
        try:
            await conns.call(shard, lambda client, t: read_blob(client, t, name, sink), deadline_s)
            return True
        except (*CALL_ERRORS, CorruptBlob) as err:
            if not _is_not_found(err):
                log.warning("blob %r from kvcache shard %s failed (%s); trying the next replica", name, shard,
                            describe(err))
    return False


def _is_not_found(err: BaseException) -> bool:
    return isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.NOT_FOUND


async def read_blob(client, timeout_s: float, name: str, sink: BytesSink | FileSink) -> None:
    """Blob ``name`` from one shard (a ``KvShardClient``) into ``sink``, every chunk checked."""
    sink.reset()
    expected, received, total, done = 0, 0, 0, False
    async for chunk in client.stream("GetBlob", kvcache_pb2.GetBlobRequest(name=name), timeout_s):
        if done or chunk.chunk_index != expected:
            raise CorruptBlob(f"blob {name!r}: chunk {chunk.chunk_index} arrived where {expected} was due")
        if zlib.crc32(chunk.data) != chunk.checksum:
            raise CorruptBlob(f"blob {name!r}: chunk {expected} fails its CRC-32")
        total = chunk.total_bytes if expected == 0 else total
        sink.write(chunk.data)
        received, expected, done = received + len(chunk.data), expected + 1, chunk.last
    if not done or received != total:
        raise CorruptBlob(f"blob {name!r}: got {received} of {total} bytes (last chunk seen: {done})")
