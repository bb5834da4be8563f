"""Named blobs for model caching (e.g. a weights shard), written and read in chunks.

A blob becomes visible only when its whole stream arrived: chunks in chunk_index order from 0,
each with a correct CRC-32, the last one marked last. A blob put again under the same name
replaces the old one (a reader already streaming keeps the old bytes). With a directory every
blob is one file (see blobfile.py) and survives a restart; without one, blobs live in memory.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Self

from cloudmatrix.errors import FieldError
from services.kvcache.blobfile import (
    SUFFIX,
    BlobEntry,
    data_crc,
    encode_header,
    file_path,
    read_header,
)

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class BlobChunk:
    name: str
    chunk_index: int
    data: bytes = dataclasses.field(repr=False)
    checksum: int           # CRC-32 of data
    last: bool = False
    total_bytes: int = 0    # whole blob size, on chunk 0 (0 = not given)


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    name: str
    bytes: int
    chunks: int


class BlobNotFound(KeyError):
    """No complete, intact blob has this name (the servicer answers NOT_FOUND)."""

    def __str__(self) -> str:
        return f"no blob named {self.args[0]!r}"


class BlobWriter:
    """Takes one blob's chunks in order (``add``); ``finish`` makes it visible. Used as a context
    manager, an unfinished or failed write leaves nothing behind."""

    def __init__(self, name: str, path: Path | None,
                 on_commit: Callable[[str, BlobEntry, Path | None], None]) -> None:
        if not name:
            raise FieldError("name", "a blob needs a non-empty name")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise FieldError("name", f"must be at most {MAX_NAME_BYTES} bytes of UTF-8")
        self.name, self.path, self.on_commit = name, path, on_commit
        self.chunks = self.size = self.crc = 0
        self.total_bytes: int | None = None
        self.ended = False
        self._parts: list[bytes] = []
        self._tmp = path.parent / f"{path.stem}.{uuid.uuid4().hex[:8]}.tmp" if path else None
        self._file = open(self._tmp, "wb") if self._tmp else None  # noqa: SIM115 (held until finish/abort)
        if self._file:
            self._file.write(encode_header(name, 0, 0))  # rewritten by finish

    def add(self, chunk: BlobChunk) -> None:
        """Raises ValueError naming the field for an out-of-order, damaged or extra chunk."""
        where = f"blob {self.name!r} chunk {chunk.chunk_index}"
        if self.ended:
            raise FieldError("chunk_index", f"{where}: the chunk marked last was already received")
        if chunk.name not in ("", self.name):
            raise FieldError("name", f"{where}: {chunk.name!r} differs from the first chunk's")
        if chunk.chunk_index != self.chunks:
            raise FieldError("chunk_index", f"{where}: expected {self.chunks} (chunks go in order from 0)")
        if zlib.crc32(chunk.data) != chunk.checksum:
            raise FieldError("checksum", f"{where}: does not match the CRC-32 of data")
        if self.chunks == 0 and chunk.total_bytes:
            self.total_bytes = chunk.total_bytes
        self._write(chunk.data)
        self.chunks += 1
        self.ended = chunk.last
        over = self.total_bytes is not None and self.size > self.total_bytes
        if over or (self.ended and self.total_bytes not in (None, self.size)):
            raise FieldError("total_bytes", f"{where}: chunk 0 announced {self.total_bytes} bytes, got {self.size}")

    def finish(self) -> BlobInfo:
        if not self.ended:
            raise FieldError("last", f"blob {self.name!r} is incomplete: the stream ended after {self.chunks} chunks "
                             f"without one marked last")
        if self._file is None:
            entry = BlobEntry(self.size, self.crc, data=b"".join(self._parts))
        else:
            header = encode_header(self.name, self.size, self.crc)
            self._file.seek(0)
            self._file.write(header)
            self._file.close()
            entry = BlobEntry(self.size, self.crc, self.path, len(header))
        self.on_commit(self.name, entry, self._tmp)
        return BlobInfo(self.name, self.size, self.chunks)

    def abort(self) -> None:
        if self._file:
            self._file.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()  # after finish the tmp file was renamed away: nothing to remove

    def _write(self, data: bytes) -> None:
        if self._file:
            self._file.write(data)
        else:
            self._parts.append(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)


class BlobStore:
    def __init__(self, directory: str | os.PathLike | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.checksum_failures = 0
        self._blobs: dict[str, BlobEntry] = {}
        self._lock = threading.Lock()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._open()

    def writer(self, name: str) -> BlobWriter:
        path = file_path(self.directory, name) if self.directory is not None else None
        return BlobWriter(name, path, self._install)

    def put_blob(self, name: str, chunks: Iterable[BlobChunk]) -> BlobInfo:
        """Store a blob from its chunks; ValueError (nothing stored) unless they form a complete,
        intact, in-order stream."""
        with self.writer(name) as writer:
            for chunk in chunks:
                writer.add(chunk)
            return writer.finish()

    def get_blob(self, name: str, chunk_bytes: int) -> Iterator[BlobChunk]:
        """The blob's chunks of at most ``chunk_bytes``, verified against the stored checksum
        before the first is returned; BlobNotFound if unknown or damaged (then deleted)."""
        if chunk_bytes < 1:
            raise FieldError("chunk_bytes", f"must be >= 1, got {chunk_bytes}")
        with self._lock:
            entry = self._blobs.get(name)
        if entry is None:
            raise BlobNotFound(name)
        f = self._open_data(name, entry)
        try:
            crc, size = data_crc(f, entry.header_len)
            if (crc, size) != (entry.checksum, entry.size):
                self._drop(name, entry, "data does not match its checksum", count=True)
                raise BlobNotFound(name)
        except BaseException:
            f.close()
            raise
        f.seek(entry.header_len)
        return _chunks(name, entry.size, chunk_bytes, f)

    def stats(self) -> tuple[int, int, int]:
        """(blobs, bytes, checksum failures)."""
        with self._lock:
            return len(self._blobs), sum(e.size for e in self._blobs.values()), self.checksum_failures

    def _install(self, name: str, entry: BlobEntry, tmp: Path | None) -> None:
        """Make a finished blob visible: rename its file into place and index it, together."""
        with self._lock:
            if tmp is not None:
                os.replace(tmp, entry.path)
            self._blobs[name] = entry

    def _open_data(self, name: str, entry: BlobEntry) -> BinaryIO:
        if entry.data is not None:
            return io.BytesIO(entry.data)
        try:
            return open(entry.path, "rb")
        except FileNotFoundError:
            self._drop(name, entry, "file vanished", count=False)
            raise BlobNotFound(name) from None

    def _drop(self, name: str, entry: BlobEntry, why: str, count: bool) -> None:
        log.warning("blob dropped", extra={"blob": name, "why": why})
        with self._lock:
            if self._blobs.get(name) is entry:
                del self._blobs[name]
                if entry.path is not None:
                    entry.path.unlink(missing_ok=True)
            self.checksum_failures += count

    def _open(self) -> None:
        """Index the blob files already there (headers only); damaged ones are deleted."""
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                name, entry = read_header(path)
            except (ValueError, UnicodeDecodeError) as err:
                log.warning("damaged blob file deleted", extra={"path": str(path), "error": str(err)})
                path.unlink(missing_ok=True)
                self.checksum_failures += 1
                continue
            self._blobs[name] = entry


def _chunks(name: str, size: int, chunk_bytes: int, f: BinaryIO) -> Iterator[BlobChunk]:
    count = max(1, -(-size // chunk_bytes))
    with f:
        for i in range(count):
            data = f.read(chunk_bytes)
            yield BlobChunk(name, i, data, zlib.crc32(data), last=i == count - 1,
                            total_bytes=size if i == 0 else 0)
