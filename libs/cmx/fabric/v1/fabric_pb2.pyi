from cmx.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("die_id", "world_size", "group")
    DIE_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    die_id: int
    world_size: int
    group: str
    def __init__(self, die_id: _Optional[int] = ..., world_size: _Optional[int] = ..., group: _Optional[str] = ...) -> None: ...

class Parcel(_message.Message):
    __slots__ = ("peer_die", "payload")
    PEER_DIE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    peer_die: int
    payload: bytes
    def __init__(self, peer_die: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("parcels",)
    PARCELS_FIELD_NUMBER: _ClassVar[int]
    parcels: _containers.RepeatedCompositeFieldContainer[Parcel]
    def __init__(self, parcels: _Optional[_Iterable[_Union[Parcel, _Mapping]]] = ...) -> None: ...

class Detached(_message.Message):
    __slots__ = ("die_id", "reason")
    DIE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    die_id: int
    reason: str
    def __init__(self, die_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("src_die", "dst_die", "round", "hello", "bundle", "detached", "traceparent")
    SRC_DIE_FIELD_NUMBER: _ClassVar[int]
    DST_DIE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    DETACHED_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    src_die: int
    dst_die: int
    round: _common_pb2.RoundId
    hello: Hello
    bundle: Bundle
    detached: Detached
    traceparent: str
    def __init__(self, src_die: _Optional[int] = ..., dst_die: _Optional[int] = ..., round: _Optional[_Union[_common_pb2.RoundId, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., bundle: _Optional[_Union[Bundle, _Mapping]] = ..., detached: _Optional[_Union[Detached, _Mapping]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("reset",)
    RESET_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    def __init__(self, reset: _Optional[bool] = ...) -> None: ...

class LinkStats(_message.Message):
    __slots__ = ("src_die", "dst_die", "bytes", "frames", "modeled_transfer_s", "measured_s", "dispatch_bytes", "combine_bytes")
    SRC_DIE_FIELD_NUMBER: _ClassVar[int]
    DST_DIE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    MODELED_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_S_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMBINE_BYTES_FIELD_NUMBER: _ClassVar[int]
    src_die: int
    dst_die: int
    bytes: int
    frames: int
    modeled_transfer_s: float
    measured_s: float
    dispatch_bytes: int
    combine_bytes: int
    def __init__(self, src_die: _Optional[int] = ..., dst_die: _Optional[int] = ..., bytes: _Optional[int] = ..., frames: _Optional[int] = ..., modeled_transfer_s: _Optional[float] = ..., measured_s: _Optional[float] = ..., dispatch_bytes: _Optional[int] = ..., combine_bytes: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("links", "rounds_completed", "attached_dies")
    LINKS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_DIES_FIELD_NUMBER: _ClassVar[int]
    links: _containers.RepeatedCompositeFieldContainer[LinkStats]
    rounds_completed: int
    attached_dies: int
    def __init__(self, links: _Optional[_Iterable[_Union[LinkStats, _Mapping]]] = ..., rounds_completed: _Optional[int] = ..., attached_dies: _Optional[int] = ...) -> None: ...

class WaitingRequest(_message.Message):
    __slots__ = ("group", "round")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    group: str
    round: _common_pb2.RoundId
    def __init__(self, group: _Optional[str] = ..., round: _Optional[_Union[_common_pb2.RoundId, _Mapping]] = ...) -> None: ...

class WaitingReply(_message.Message):
    __slots__ = ("gathering", "missing_dies")
    GATHERING_FIELD_NUMBER: _ClassVar[int]
    MISSING_DIES_FIELD_NUMBER: _ClassVar[int]
    gathering: bool
    missing_dies: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, gathering: _Optional[bool] = ..., missing_dies: _Optional[_Iterable[int]] = ...) -> None: ...
