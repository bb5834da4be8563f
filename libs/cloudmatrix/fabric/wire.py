"""Bundle frames (cmx.fabric.v1.Frame with a Bundle body) read and written straight on the
protobuf wire, so parcel payloads are never copied into and out of message objects.

The fabric only needs a frame's headers (round, peer ids) and moves each payload as a slice of
the bytes it received into the frame it sends: one copy, where building messages costs five.
``read_bundle`` returns payloads as memoryviews into the frame; ``write_bundle`` joins header
bytes and payload pieces once. Both speak standard protobuf: a frame written here parses with
``fabric_pb2.Frame``, and any serialized Frame reads here (tests check both directions).
Frames that are not bundles (Hello, Detached) are small and go through ``fabric_pb2``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cloudmatrix.rpc.protowire import LEN as _LEN
from cloudmatrix.rpc.protowire import VARINT as _VARINT
from cloudmatrix.rpc.protowire import WireError
from cloudmatrix.rpc.protowire import fields as _fields
from cloudmatrix.rpc.protowire import varint as _varint
from cmx.common.v1 import common_pb2

# Frame field numbers (fabric.proto)
_SRC, _DST, _ROUND, _HELLO, _DETACHED, _TRACEPARENT, _BUNDLE = 1, 2, 3, 4, 9, 10, 11
_PARCELS = 1              # Bundle.parcels
_PEER, _PAYLOAD = 1, 2    # Parcel.peer_die, Parcel.payload

Buffer = bytes | bytearray | memoryview
__all__ = ["RawBundle", "WireError", "read_bundle", "write_bundle"]


@dataclasses.dataclass
class RawBundle:
    """A bundle frame's headers, and its parcels as (peer die, payload view into the frame)."""

    round: common_pb2.RoundId
    round_bytes: bytes
    traceparent: str
    parcels: list[tuple[int, memoryview]]


def read_bundle(frame: Buffer) -> RawBundle | None:
    """The bundle a frame carries, None if its body is something else. Raises WireError."""
    round_bytes, traceparent, bundle = b"", "", None
    for field, kind, value in _fields(memoryview(frame)):
        if kind != _LEN:
            continue
        if field == _ROUND:
            round_bytes = bytes(value)
        elif field == _TRACEPARENT:
            traceparent = bytes(value).decode("utf-8", "replace")
        elif field in (_HELLO, _DETACHED):
            bundle = None
        elif field == _BUNDLE:
            bundle = value
    if bundle is None:
        return None
    try:
        rid = common_pb2.RoundId.FromString(round_bytes)
    except Exception as exc:  # protobuf's DecodeError
        raise WireError(f"round: not a RoundId ({exc})") from exc
    return RawBundle(rid, round_bytes, traceparent, [_read_parcel(p) for f, k, p in _fields(bundle)
                                                     if f == _PARCELS and k == _LEN])


def _read_parcel(buf: memoryview) -> tuple[int, memoryview]:
    peer, payload = 0, buf[:0]
    for field, kind, value in _fields(buf):
        if field == _PEER and kind == _VARINT:
            peer = value
        elif field == _PAYLOAD and kind == _LEN:
            payload = value
    return peer, payload


def write_bundle(round_bytes: bytes, traceparent: str, parcels: Sequence[tuple[int, Sequence[Buffer]]],
                 src: int = 0, dst: int = 0) -> bytes:
    """A serialized Frame with a Bundle body. ``parcels``: (peer die, payload pieces), each
    payload being the concatenation of its pieces."""
    pieces: list[Buffer] = []
    bundle_size = 0
    for peer, payload in parcels:
        size = sum(len(p) for p in payload)
        head = _varint(_PEER << 3 | _VARINT) + _varint(peer)
        if size:
            head += _varint(_PAYLOAD << 3 | _LEN) + _varint(size)
        parcel_size = len(head) + size
        entry = _varint(_PARCELS << 3 | _LEN) + _varint(parcel_size) + head
        pieces.append(entry)
        pieces.extend(payload)
        bundle_size += len(entry) + size
    header = b""
    if src:
        header += _varint(_SRC << 3 | _VARINT) + _varint(src)
    if dst:
        header += _varint(_DST << 3 | _VARINT) + _varint(dst)
    header += _varint(_ROUND << 3 | _LEN) + _varint(len(round_bytes)) + round_bytes
    if traceparent:
        encoded = traceparent.encode()
        header += _varint(_TRACEPARENT << 3 | _LEN) + _varint(len(encoded)) + encoded
    header += _varint(_BUNDLE << 3 | _LEN) + _varint(bundle_size)
    return b"".join([header, *pieces])
