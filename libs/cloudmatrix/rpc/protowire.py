"""The few pieces of the protobuf wire format the hot paths write by hand: a serialized message
is the concatenation of its fields, so a message's small fields can be serialized by protobuf
and a large bytes field appended as ``field_header(number, size) + data`` without building a
message around the data (protobuf would copy it twice)."""
from __future__ import annotations

LEN = 2  # wire type of bytes, strings and embedded messages


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
