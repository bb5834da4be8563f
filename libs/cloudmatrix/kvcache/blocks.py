"""The pool client's boundary types: blocks in, fetched blocks and per-block results out.

Protos stay in here and in the call sites; callers see only these dataclasses (and the shard's
``StatsReply`` from ``KvPoolClient.stats``).
"""
from __future__ import annotations

import dataclasses
import functools
import zlib

from cloudmatrix.rpc.protowire import field_header
from cmx.common.v1 import common_pb2
from cmx.kvcache.v1 import kvcache_pb2

KEY_BYTES = 16
_KIND_TO_PROTO = {"full": common_pb2.BLOCK_KIND_FULL, "tail": common_pb2.BLOCK_KIND_TAIL}
_PUT_BLOCK_DATA = kvcache_pb2.PutBlock.DESCRIPTOR.fields_by_name["data"].number
_PROTO_TO_KIND = {v: k for k, v in _KIND_TO_PROTO.items()}
ACK_STATUSES = frozenset({kvcache_pb2.PUT_STATUS_STORED, kvcache_pb2.PUT_STATUS_DUPLICATE})


def block_kind(kind: str | int) -> str:
    """"full" / "tail" from either that string or the ``cmx.common.v1.BlockKind`` enum value."""
    if isinstance(kind, str) and kind in _KIND_TO_PROTO:
        return kind
    if isinstance(kind, int) and kind in _PROTO_TO_KIND:
        return _PROTO_TO_KIND[kind]
    raise ValueError(f"block kind must be 'full', 'tail' or BLOCK_KIND_FULL/TAIL, got {kind!r}")


@dataclasses.dataclass(frozen=True)
class Block:
    """One immutable KV block: ``key`` is its 16-byte prefix-hash digest (it covers namespace)."""

    key: bytes
    namespace: str
    kind: str | int  # "full" | "tail" (an enum value is accepted and normalized to the string)
    num_tokens: int
    data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"block key must be {KEY_BYTES} bytes, got {self.key!r}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        object.__setattr__(self, "kind", block_kind(self.kind))

    @functools.cached_property
    def checksum(self) -> int:
        """CRC-32 (IEEE, as zlib.crc32) of ``data``."""
        return zlib.crc32(self.data)

    def to_proto(self) -> kvcache_pb2.PutBlock:
        return kvcache_pb2.PutBlock(key=self.key, namespace=self.namespace, kind=_KIND_TO_PROTO[self.kind],
                                    num_tokens=self.num_tokens, data=self.data, checksum=self.checksum)

    def to_wire(self, lease_id: str = "") -> bytes:
        """The serialized PutBlock (it parses as ``to_proto()``, plus ``lease_id`` for the block to
        join), with ``data`` appended once instead of being copied into a message and out again:
        what a Put stream sends."""
        head = kvcache_pb2.PutBlock(key=self.key, namespace=self.namespace, kind=_KIND_TO_PROTO[self.kind],
                                    num_tokens=self.num_tokens, checksum=self.checksum,
                                    lease_id=lease_id).SerializeToString()
        return b"".join((head, field_header(_PUT_BLOCK_DATA, len(self.data)), self.data))


@dataclasses.dataclass(frozen=True)
class FetchedBlock(Block):
    """A block read back from the pool, checksum verified; ``shard`` is the replica that served it."""

    shard: str = ""

    @classmethod
    def from_reply(cls, reply, shard: str) -> FetchedBlock:
        """From a GetReply, or anything with its fields (reads.WireReply)."""
        return cls(key=reply.key, namespace=reply.namespace, kind=reply.kind, num_tokens=reply.num_tokens,
                   data=reply.data, shard=shard)


@dataclasses.dataclass(frozen=True)
class PutResult:
    """Where one block landed: acknowledged once ``write_quorum`` shards stored it (or had it).

    ``replicas`` are the block's ring replicas; ``stored_on`` the shards that answered STORED or
    DUPLICATE, a stand-in for a replica that is marked down among them; ``errors`` says, per shard
    that did not, why (down, a rejection or an RPC failure).
    """

    key: bytes
    acknowledged: bool
    replicas: tuple[str, ...]
    stored_on: tuple[str, ...]
    errors: dict[str, str]
    conflicts: tuple[str, ...] = ()   # shards among ``errors`` that hold another version of the key
    leased_on: tuple[str, ...] = ()   # shards where the block (or their version) joined the put's lease

    @property
    def only_conflicts(self) -> bool:
        """Refused, and only because shards already hold another version of the key."""
        return bool(self.errors) and set(self.errors) <= set(self.conflicts)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why one shard did not store a block: its message, and whether it was a CONFLICT."""

    message: str
    conflict: bool = False

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True)
class BlobPutResult:
    """Where one blob landed; acknowledged once ``write_quorum`` replicas stored all of it."""

    name: str
    acknowledged: bool
    replicas: tuple[str, ...]
    stored_on: tuple[str, ...]
    errors: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Lease:
    """Leases taken on the replicas: one lease id per shard; ``leased[i]``: key i pinned somewhere."""

    lease_ids: dict[str, str]
    leased: tuple[bool, ...]
    ttl_s: float  # the smallest ttl any shard granted (0.0 when none did)


@dataclasses.dataclass(frozen=True)
class DeleteResult:
    """Counts summed over every replica asked; ``errors`` names replicas that did not answer."""

    deleted: int
    missing: int
    refused_leased: int
    errors: dict[str, str]


def refusal(status: kvcache_pb2.KeyStatus) -> Refusal:
    return Refusal(status_message(status), status.status == kvcache_pb2.PUT_STATUS_REJECTED_CONFLICT)


def status_message(status: kvcache_pb2.KeyStatus) -> str:
    """"PUT_STATUS_REJECTED_CONFLICT: <shard's message>" for a refused block."""
    name = kvcache_pb2.PutStatus.Name(status.status)
    return f"{name}: {status.message}" if status.message else name
