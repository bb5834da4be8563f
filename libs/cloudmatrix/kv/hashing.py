"""Prefix block keys: the same in every process, on every machine, forever (golden-vector tested).

key(block i) = BLAKE2b-128 keyed with SEED over
    kind (b"F" full / b"T" tail) | parent key (16 B) | namespace (u32 length + UTF-8) |
    token count (u32) | token ids (u32 little-endian each)
The parent of block 0 is the namespace's root key (kind b"R", parent 16 zero bytes, no tokens).
Chaining makes a key stand for the whole prefix up to its block, so equal prefixes give equal
keys and a lookup of a prompt's keys in order finds its longest cached prefix. A partial last
block is keyed as a tail block (kind b"T"): it can never be mistaken for a full block of the same
tokens, and no block chains from it. The namespace, "<model>|<precision>|<kv dtype>|bs<block
size>" (then "|mtp1" when every block carries the MTP module's KV as one more layer), names
everything that changes a block's bytes, so two models, serving precisions or layouts never
share blocks. Never Python's hash(), never a random root.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Sequence

SEED = b"cloudmatrix-infer/kv-block/v1"
KEY_BYTES = 16
_KINDS = {"root": b"R", "full": b"F", "tail": b"T"}


def namespace(model_id: str, kv_dtype: str, block_size: int, precision: str, mtp: bool = False) -> str:
    """The namespace string: model id, serving precision, KV dtype and block size (tokens), and
    "|mtp1" when blocks carry the MTP module's KV as one more layer (speculative decoding).

    The precision is part of it because it changes the KV bytes even where the KV dtype does not
    (INT8 weights, PASA attention): instances of one checkpoint served in different precisions
    must never share blocks; nor must instances with and without the MTP layer."""
    for field, value in (("model_id", model_id), ("precision", precision)):
        if not value or "|" in value:
            raise ValueError(f"{field} must be non-empty and free of '|', got {value!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return f"{model_id}|{precision}|{kv_dtype}|bs{block_size}" + ("|mtp1" if mtp else "")


def _digest(kind: str, parent: bytes, ns: str, token_ids: Sequence[int]) -> bytes:
    if len(parent) != KEY_BYTES:
        raise ValueError(f"parent key must be {KEY_BYTES} bytes, got {len(parent)}")
    if any(not 0 <= t < 2**32 for t in token_ids):
        raise ValueError("token ids must be in [0, 2**32)")
    ns_bytes = ns.encode("utf-8")
    h = hashlib.blake2b(digest_size=KEY_BYTES, key=SEED)
    h.update(_KINDS[kind] + parent + struct.pack("<I", len(ns_bytes)) + ns_bytes)
    h.update(struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids))
    return h.digest()


def root_key(ns: str) -> bytes:
    return _digest("root", bytes(KEY_BYTES), ns, ())


def block_key(parent: bytes, token_ids: Sequence[int], ns: str, tail: bool = False) -> bytes:
    return _digest("tail" if tail else "full", parent, ns, token_ids)


@dataclasses.dataclass(frozen=True)
class PrefixKeys:
    """A token sequence's block keys: one per full block, in order, and the tail's (if any)."""

    full: tuple[bytes, ...]
    tail: bytes | None
    block_size: int
    num_tokens: int

    @property
    def all(self) -> tuple[bytes, ...]:
        return self.full + ((self.tail,) if self.tail is not None else ())


def prefix_keys(token_ids: Sequence[int], block_size: int, ns: str) -> PrefixKeys:
    """Chain the keys of ``token_ids`` cut into blocks of ``block_size`` tokens."""
    parent, full = root_key(ns), []
    whole = len(token_ids) - len(token_ids) % block_size
    for start in range(0, whole, block_size):
        parent = block_key(parent, token_ids[start:start + block_size], ns)
        full.append(parent)
    tail = block_key(parent, token_ids[whole:], ns, tail=True) if whole < len(token_ids) else None
    return PrefixKeys(tuple(full), tail, block_size, len(token_ids))
