"""The on-disk layout of one blob: ``<sha256(name)[:40]>.blob``, little-endian.

    offset  size  field
    0       4     magic b"CMXO"
    4       2     version (1)
    6       2     name length N
    8       8     data length D
    16      4     CRC-32 of data
    20      N     name, UTF-8
    20+N    4     header CRC-32 of bytes [0, 20+N)
    24+N    D     data

Written to a ``.tmp`` file and renamed into place, so a crash never leaves a torn blob visible.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

MAGIC = b"CMXO"
VERSION = 1
SUFFIX = ".blob"
_FIXED = struct.Struct("<4sHHQI")
_CRC = struct.Struct("<I")
_READ_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class BlobEntry:
    """Where a complete blob lives: a file (data after header_len bytes) or memory."""

    size: int
    checksum: int               # CRC-32 of the whole blob
    path: Path | None = None
    header_len: int = 0
    data: bytes | None = None


def file_path(directory: Path, name: str) -> Path:
    return directory / f"{hashlib.sha256(name.encode()).hexdigest()[:40]}{SUFFIX}"


def encode_header(name: str, size: int, checksum: int) -> bytes:
    raw = name.encode()
    head = _FIXED.pack(MAGIC, VERSION, len(raw), size, checksum) + raw
    return head + _CRC.pack(zlib.crc32(head))


def read_header(path: Path) -> tuple[str, BlobEntry]:
    """(name, entry) of a blob file; ValueError if its header or length is damaged."""
    with open(path, "rb") as f:
        head = f.read(_FIXED.size)
        if len(head) < _FIXED.size:
            raise ValueError("file shorter than the header")
        magic, version, name_len, size, checksum = _FIXED.unpack(head)
        rest = f.read(name_len + _CRC.size)
        file_size = os.fstat(f.fileno()).st_size
    if magic != MAGIC or version != VERSION or len(rest) < name_len + _CRC.size:
        raise ValueError("bad magic, version or header length")
    if _CRC.unpack_from(rest, name_len)[0] != zlib.crc32(head + rest[:name_len]):
        raise ValueError("header checksum mismatch")
    entry = BlobEntry(size, checksum, path, len(head) + len(rest))
    if file_size != entry.header_len + size:
        raise ValueError(f"file holds {file_size - entry.header_len} data bytes, header says {size}")
    return rest[:name_len].decode(), entry


def data_crc(f: BinaryIO, offset: int) -> tuple[int, int]:
    """(CRC-32, length) of everything in ``f`` from ``offset`` on."""
    f.seek(offset)
    crc = size = 0
    while block := f.read(_READ_BYTES):
        crc, size = zlib.crc32(block, crc), size + len(block)
    return crc, size
