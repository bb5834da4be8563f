"""A KV block as the shard stores it, and the checks every Put runs before a block is admitted.

A block is immutable: key (a 16-byte prefix-hash digest that already covers the namespace),
namespace, kind (FULL or TAIL), num_tokens, data (by convention a serialized
``cmx.common.v1.Tensor`` holding the block's latent KV) and the CRC-32 of data.
"""
from __future__ import annotations

import dataclasses
import enum
import zlib
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.tensor_codec import validate_tensor
from cmx.common.v1 import common_pb2

KEY_BYTES = 16
MAX_NAMESPACE_BYTES = 1024
KINDS = {common_pb2.BLOCK_KIND_FULL: "FULL", common_pb2.BLOCK_KIND_TAIL: "TAIL"}


@dataclasses.dataclass(frozen=True)
class BlockMeta:
    """What the shard knows about a block without reading its data."""

    namespace: str
    kind: int
    num_tokens: int
    checksum: int  # CRC-32 (zlib.crc32) of data
    size: int      # bytes of data


@dataclasses.dataclass(frozen=True)
class Block:
    key: bytes
    namespace: str
    kind: int
    num_tokens: int
    data: bytes = dataclasses.field(repr=False)
    checksum: int

    @property
    def meta(self) -> BlockMeta:
        return BlockMeta(self.namespace, self.kind, self.num_tokens, self.checksum, len(self.data))

    def intact(self) -> bool:
        """True when data still matches the checksum recorded at Put."""
        return zlib.crc32(self.data) == self.checksum


class PutOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same key, same bytes and metadata: nothing changed
    CONFLICT = "conflict"    # same key, different bytes or metadata: rejected (blocks are immutable)
    CAPACITY = "capacity"    # does not fit even after evicting every unleased block


def check_key(key: bytes, field: str = "key") -> None:
    if len(key) != KEY_BYTES:
        raise FieldError(field, f"must be exactly {KEY_BYTES} bytes, got {len(key)}")


def check_keys(keys: Sequence[bytes]) -> None:
    for i, key in enumerate(keys):
        check_key(key, f"keys[{i}]")


def validate_block(block: Block, max_block_bytes: int) -> None:
    """Raise ValueError naming the field when ``block`` may not be stored."""
    check_key(block.key)
    if block.kind not in KINDS:
        raise FieldError("kind", f"must be BLOCK_KIND_FULL or BLOCK_KIND_TAIL, got {block.kind}")
    if not 1 <= block.num_tokens < 2**32:
        raise FieldError("num_tokens", f"must be in [1, 2**32), got {block.num_tokens}")
    if len(block.namespace.encode()) > MAX_NAMESPACE_BYTES:
        raise FieldError("namespace", f"must be at most {MAX_NAMESPACE_BYTES} bytes of UTF-8")
    if len(block.data) > max_block_bytes:
        raise FieldError("data", f"{len(block.data)} bytes is over max_block_bytes ({max_block_bytes})")
    actual = zlib.crc32(block.data)
    if actual != block.checksum:
        raise FieldError("checksum", f"{block.checksum:#010x} does not match the CRC-32 of data ({actual:#010x})")
    check_tensor(block.data)


def check_tensor(data: bytes) -> None:
    """data must be a serialized cmx.common.v1.Tensor whose dtype, shape and length agree."""
    try:
        tensor = common_pb2.Tensor.FromString(data)
    except DecodeError as err:
        raise FieldError("data", f"not a serialized cmx.common.v1.Tensor ({err})") from err
    validate_tensor(tensor, name="data")  # raises TensorDecodeError (a ValueError) naming the mismatch
