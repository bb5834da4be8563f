from cmx.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUT_STATUS_UNSPECIFIED: _ClassVar[PutStatus]
    PUT_STATUS_STORED: _ClassVar[PutStatus]
    PUT_STATUS_DUPLICATE: _ClassVar[PutStatus]
    PUT_STATUS_REJECTED_CHECKSUM: _ClassVar[PutStatus]
    PUT_STATUS_REJECTED_CAPACITY: _ClassVar[PutStatus]
    PUT_STATUS_REJECTED_INVALID: _ClassVar[PutStatus]
    PUT_STATUS_REJECTED_CONFLICT: _ClassVar[PutStatus]
PUT_STATUS_UNSPECIFIED: PutStatus
PUT_STATUS_STORED: PutStatus
PUT_STATUS_DUPLICATE: PutStatus
PUT_STATUS_REJECTED_CHECKSUM: PutStatus
PUT_STATUS_REJECTED_CAPACITY: PutStatus
PUT_STATUS_REJECTED_INVALID: PutStatus
PUT_STATUS_REJECTED_CONFLICT: PutStatus

class PutBlock(_message.Message):
    __slots__ = ("key", "namespace", "kind", "num_tokens", "data", "checksum", "lease_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    namespace: str
    kind: _common_pb2.BlockKind
    num_tokens: int
    data: bytes
    checksum: int
    lease_id: str
    def __init__(self, key: _Optional[bytes] = ..., namespace: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.BlockKind, str]] = ..., num_tokens: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ..., lease_id: _Optional[str] = ...) -> None: ...

class KeyStatus(_message.Message):
    __slots__ = ("key", "status", "message", "leased")
    KEY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    status: PutStatus
    message: str
    leased: bool
    def __init__(self, key: _Optional[bytes] = ..., status: _Optional[_Union[PutStatus, str]] = ..., message: _Optional[str] = ..., leased: _Optional[bool] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("stored", "duplicates", "rejected", "statuses")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    stored: int
    duplicates: int
    rejected: int
    statuses: _containers.RepeatedCompositeFieldContainer[KeyStatus]
    def __init__(self, stored: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[int] = ..., statuses: _Optional[_Iterable[_Union[KeyStatus, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "release_lease_ids")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    release_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., release_lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetReply(_message.Message):
    __slots__ = ("key", "found", "data", "checksum", "kind", "num_tokens", "namespace")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    found: bool
    data: bytes
    checksum: int
    kind: _common_pb2.BlockKind
    num_tokens: int
    namespace: str
    def __init__(self, key: _Optional[bytes] = ..., found: _Optional[bool] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ..., kind: _Optional[_Union[_common_pb2.BlockKind, str]] = ..., num_tokens: _Optional[int] = ..., namespace: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("keys", "lease_ttl_s")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    lease_ttl_s: float
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., lease_ttl_s: _Optional[float] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("present", "longest_prefix", "lease_id", "leased", "lease_ttl_s")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    LONGEST_PREFIX_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    longest_prefix: int
    lease_id: str
    leased: _containers.RepeatedScalarFieldContainer[bool]
    lease_ttl_s: float
    def __init__(self, present: _Optional[_Iterable[bool]] = ..., longest_prefix: _Optional[int] = ..., lease_id: _Optional[str] = ..., leased: _Optional[_Iterable[bool]] = ..., lease_ttl_s: _Optional[float] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("keys", "ttl_s")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_s: float
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class LeaseReply(_message.Message):
    __slots__ = ("lease_id", "leased", "ttl_s")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    leased: _containers.RepeatedScalarFieldContainer[bool]
    ttl_s: float
    def __init__(self, lease_id: _Optional[str] = ..., leased: _Optional[_Iterable[bool]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_ids",)
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("deleted", "missing", "refused_leased")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    REFUSED_LEASED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    missing: int
    refused_leased: int
    def __init__(self, deleted: _Optional[int] = ..., missing: _Optional[int] = ..., refused_leased: _Optional[int] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("after", "limit")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after: bytes
    limit: int
    def __init__(self, after: _Optional[bytes] = ..., limit: _Optional[int] = ...) -> None: ...

class ListKeysReply(_message.Message):
    __slots__ = ("keys", "more")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    more: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., more: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("blocks", "used_bytes", "capacity_bytes", "leased_blocks", "disk_blocks", "disk_bytes", "hits", "misses", "stored", "duplicates", "rejected", "evictions", "blobs", "blob_bytes", "checksum_failures", "conflicts", "promotions", "spills", "name", "boot_id")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    BLOB_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    SPILLS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    used_bytes: int
    capacity_bytes: int
    leased_blocks: int
    disk_blocks: int
    disk_bytes: int
    hits: int
    misses: int
    stored: int
    duplicates: int
    rejected: int
    evictions: int
    blobs: int
    blob_bytes: int
    checksum_failures: int
    conflicts: int
    promotions: int
    spills: int
    name: str
    boot_id: str
    def __init__(self, blocks: _Optional[int] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., leased_blocks: _Optional[int] = ..., disk_blocks: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., stored: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[int] = ..., evictions: _Optional[int] = ..., blobs: _Optional[int] = ..., blob_bytes: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., conflicts: _Optional[int] = ..., promotions: _Optional[int] = ..., spills: _Optional[int] = ..., name: _Optional[str] = ..., boot_id: _Optional[str] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("name", "chunk_index", "data", "checksum", "last", "total_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    chunk_index: int
    data: bytes
    checksum: int
    last: bool
    total_bytes: int
    def __init__(self, name: _Optional[str] = ..., chunk_index: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ..., last: _Optional[bool] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class PutBlobReply(_message.Message):
    __slots__ = ("name", "bytes", "chunks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    bytes: int
    chunks: int
    def __init__(self, name: _Optional[str] = ..., bytes: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class GetBlobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
