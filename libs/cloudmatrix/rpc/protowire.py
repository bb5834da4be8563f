"""The few pieces of the protobuf wire format the hot paths write by hand: a serialized message
is the concatenation of its fields, so a message's small fields can be serialized by protobuf
and a large bytes field appended as ``field_header(number, size) + data`` without building a
message around the data (protobuf would copy it twice)."""
from __future__ import annotations

from collections.abc import Iterator

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5  # wire types


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_header(number: int, size: int) -> bytes:
    """Tag and length of a length-delimited field of ``size`` bytes."""
    return varint(number << 3 | LEN) + varint(size)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for every field of a serialized message: an int for
    VARINT / FIXED32 / FIXED64 (little-endian, unsigned), a memoryview into ``buf`` for LEN."""
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        field, kind = tag >> 3, tag & 7
        if kind == VARINT:
            value, pos = _read_varint(buf, pos)
        elif kind == LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise WireError(f"field {field}: length {size} runs past the end of the message")
            value, pos = buf[pos:pos + size], pos + size
        elif kind in (FIXED64, FIXED32):
            width = 8 if kind == FIXED64 else 4
            if pos + width > len(buf):
                raise WireError(f"field {field}: truncated fixed-width value")
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        else:
            raise WireError(f"field {field}: unsupported wire type {kind}")
        yield field, kind, value
