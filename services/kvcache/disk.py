"""The disk tier: one file per block in a directory, its own capacity and its own LRU.

File ``<32 hex digits of the key>.blk``, little-endian:

    offset  size  field
    0       4     magic b"CMXB"
    4       2     version (1)
    6       1     kind (cmx.common.v1.BlockKind)
    7       1     reserved (0)
    8       4     num_tokens
    12      4     checksum: CRC-32 of data
    16      8     data length D
    24      16    key
    40      2     namespace length N
    42      N     namespace, UTF-8
    42+N    4     header CRC-32 of bytes [0, 42+N)
    46+N    D     data

Files are written to ``<hex>.tmp`` and renamed into place, so a crash (SIGKILL included) never
leaves a torn ``.blk`` visible; leftover ``.tmp`` files are removed when the tier opens. By default
there is no fsync: after a power loss a file may be damaged or lost (the header and data checksums
catch damage). With ``fsync`` the file and then its directory are synced before ``write`` returns:
a block on disk survives a power loss, at the cost of two syncs per block (docs/kvcache.md).
"""
from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

from services.kvcache.blocks import KEY_BYTES, Block, BlockMeta

log = logging.getLogger(__name__)

MAGIC = b"CMXB"
VERSION = 1
_FIXED = struct.Struct("<4sHBxIIQ16sH")
_CRC = struct.Struct("<I")
SUFFIX = ".blk"


class CorruptBlock(Exception):
    """A block file failed a check; the file has been deleted."""


def encode_header(block: Block) -> bytes:
    namespace = block.namespace.encode()
    head = _FIXED.pack(MAGIC, VERSION, block.kind, block.num_tokens, block.checksum, len(block.data),
                       block.key, len(namespace)) + namespace
    return head + _CRC.pack(zlib.crc32(head))


def decode_header(buf: bytes) -> tuple[bytes, BlockMeta, int]:
    """(key, meta, header length) from the start of a block file; raises CorruptBlock."""
    if len(buf) < _FIXED.size:
        raise CorruptBlock("file shorter than the header")
    magic, version, kind, num_tokens, checksum, size, key, ns_len = _FIXED.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        raise CorruptBlock(f"bad magic {magic!r} or version {version}")
    end = _FIXED.size + ns_len
    if len(buf) < end + _CRC.size:
        raise CorruptBlock("file shorter than the header")
    if _CRC.unpack_from(buf, end)[0] != zlib.crc32(buf[:end]):
        raise CorruptBlock("header checksum mismatch")
    namespace = buf[_FIXED.size:end].decode()
    return key, BlockMeta(namespace, kind, num_tokens, checksum, size), end + _CRC.size


class DiskTier:
    """Block files in ``directory``; the least recently used files go first when it is full.

    Not thread-safe on its own: the shard's store serializes every call.
    """

    def __init__(self, directory: str | os.PathLike, capacity_bytes: int, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self.index: OrderedDict[bytes, BlockMeta] = OrderedDict()  # oldest first
        self.used_bytes = 0
        self.dropped_on_open = 0  # damaged files deleted while indexing
        self.directory.mkdir(parents=True, exist_ok=True)
        self._open()

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def path(self, key: bytes) -> Path:
        return self.directory / f"{key.hex()}{SUFFIX}"

    def touch(self, key: bytes) -> None:
        self.index.move_to_end(key)

    def write(self, block: Block) -> bool:
        """Store ``block`` as the newest file, deleting the oldest ones to make room.
        False when it is larger than the whole tier. OSError propagates (nothing is indexed)."""
        size = len(block.data)
        if size > self.capacity_bytes:
            return False
        self.remove(block.key)
        while self.used_bytes + size > self.capacity_bytes:
            self.remove(next(iter(self.index)))
        path = self.path(block.key)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(encode_header(block))
                f.write(block.data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.fsync:
                self._sync_directory()
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self._index(block.key, block.meta)
        return True

    def _sync_directory(self) -> None:
        """Make the rename durable: sync the directory entry."""
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, key: bytes) -> Block | None:
        """The block, verified; None if its file vanished. A damaged file is deleted and raises
        CorruptBlock."""
        try:
            buf = self.path(key).read_bytes()
        except FileNotFoundError:
            log.warning("block file vanished", extra={"key": key.hex()})
            self._forget(key)
            return None
        try:
            return _parse_block(key, buf)
        except CorruptBlock:
            self.remove(key)
            raise

    def remove(self, key: bytes) -> bool:
        if key not in self.index:
            return False
        self.path(key).unlink(missing_ok=True)
        self._forget(key)
        return True

    def _index(self, key: bytes, meta: BlockMeta) -> None:
        self.index[key] = meta
        self.used_bytes += meta.size

    def _forget(self, key: bytes) -> None:
        meta = self.index.pop(key, None)
        if meta is not None:
            self.used_bytes -= meta.size

    def _open(self) -> None:
        """Index the files already there (headers only), oldest modification first."""
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                key, meta = _read_header(path)
            except CorruptBlock as err:
                log.warning("damaged block file deleted", extra={"path": str(path), "error": str(err)})
                path.unlink(missing_ok=True)
                self.dropped_on_open += 1
                continue
            found.append((path.stat().st_mtime_ns, key, meta))
        for _, key, meta in sorted(found, key=lambda item: item[0]):
            self._index(key, meta)
        while self.used_bytes > self.capacity_bytes:
            self.remove(next(iter(self.index)))


def _read_header(path: Path) -> tuple[bytes, BlockMeta]:
    with open(path, "rb") as f:
        head = f.read(_FIXED.size)
        if len(head) == _FIXED.size:
            head += f.read(_FIXED.unpack_from(head)[-1] + _CRC.size)
        key, meta, header_len = decode_header(head)
        file_size = os.fstat(f.fileno()).st_size
    if path.stem != key.hex() or len(key) != KEY_BYTES:
        raise CorruptBlock(f"file name does not match the key {key.hex()} in its header")
    if file_size != header_len + meta.size:
        raise CorruptBlock(f"file holds {file_size - header_len} data bytes, header says {meta.size}")
    return key, meta


def _parse_block(key: bytes, buf: bytes) -> Block:
    stored_key, meta, header_len = decode_header(buf)
    data = buf[header_len:]
    if stored_key != key:
        raise CorruptBlock(f"header holds key {stored_key.hex()}")
    if len(data) != meta.size:
        raise CorruptBlock(f"file holds {len(data)} data bytes, header says {meta.size}")
    if zlib.crc32(data) != meta.checksum:
        raise CorruptBlock("data checksum mismatch")
    return Block(key, meta.namespace, meta.kind, meta.num_tokens, data, meta.checksum)
