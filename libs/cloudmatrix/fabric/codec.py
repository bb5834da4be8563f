"""TokenRows <-> parcel payloads, and round ids.

A payload is raw little-endian tensor bytes behind a 16-byte header (fabric.proto, Parcel):

    u8 version (1) | u8 hidden dtype (cmx.common.v1.DType) | u8 flags (bit 0: scales follow)
    | u8 reserved | u32 rows n | u32 hidden size D | u32 reserved
    hidden [n, D], zero padded to a multiple of 8 bytes
    per-row table int32 [3 or 4, n]: token_index, expert_ids, weights (float32 bits),
    scales (float32 bits, if flagged)

A round's payloads are small and many, so the codec keeps the tensor calls per payload few
(two sections, not five). Encoding hands the tensors' own bytes to the frame writer (no copy
here); decoding copies the payload once into a buffer the returned tensors share.
"""
from __future__ import annotations

import struct

import torch

from cloudmatrix.moe.dispatch import TokenRows
from cmx.common.v1 import common_pb2

ROUND_KINDS = {"dispatch": common_pb2.ROUND_KIND_DISPATCH, "combine": common_pb2.ROUND_KIND_COMBINE}
PAYLOAD_VERSION = 1
_HEADER = struct.Struct("<BBBBIII")
_HIDDEN_DTYPES = {torch.int8: common_pb2.DTYPE_INT8, torch.bfloat16: common_pb2.DTYPE_BFLOAT16,
                  torch.float16: common_pb2.DTYPE_FLOAT16, torch.float32: common_pb2.DTYPE_FLOAT32}
_TORCH_DTYPES = {enum: dtype for dtype, enum in _HIDDEN_DTYPES.items()}
_ZEROS = bytes(8)


def round_id(step: int, layer: int, microbatch: int, kind: str) -> common_pb2.RoundId:
    return common_pb2.RoundId(step=step, layer=layer, microbatch=microbatch, kind=ROUND_KINDS[kind])


def round_key(r: common_pb2.RoundId) -> tuple[int, int, int, int]:
    return r.step, r.layer, r.microbatch, r.kind


def _pad(size: int) -> int:
    return -size % 8


def _raw(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes (bf16 as its int16 bits: numpy has no bfloat16)."""
    t = t.contiguous()
    return memoryview((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()).cast("B")


def to_payload(rows: TokenRows | None) -> list[memoryview | bytes]:
    """Rows for one peer as payload pieces (their concatenation is the payload); [] when none."""
    if rows is None or len(rows) == 0:
        return []
    hidden = rows.hidden
    if hidden.dim() != 2 or hidden.dtype not in _HIDDEN_DTYPES:
        raise ValueError(f"hidden must be 2-D {', '.join(map(str, _HIDDEN_DTYPES))}, got {hidden.dtype} "
                         f"{list(hidden.shape)}")
    n, dim = hidden.shape
    per_row = [rows.token_index.to(torch.int32), rows.expert_ids.to(torch.int32),
               rows.weights.to(torch.float32).view(torch.int32)]
    per_row += [rows.scales.to(torch.float32).view(torch.int32)] if rows.scales is not None else []
    data = _raw(hidden)
    header = _HEADER.pack(PAYLOAD_VERSION, _HIDDEN_DTYPES[hidden.dtype], int(rows.scales is not None), 0, n, dim, 0)
    return [header, data, _ZEROS[:_pad(len(data))], _raw(torch.stack(per_row))]


def from_payload(payload: bytes | memoryview, src: int) -> TokenRows | None:
    """The rows a parcel from die ``src`` carries; None when empty. A malformed payload raises
    ValueError saying what is wrong."""
    if not len(payload):
        return None
    if len(payload) < _HEADER.size:
        raise ValueError(f"parcel from die {src}: {len(payload)} bytes is shorter than the payload header")
    version, dtype, flags, _, n, dim, _ = _HEADER.unpack_from(payload)
    if version != PAYLOAD_VERSION or dtype not in _TORCH_DTYPES:
        raise ValueError(f"parcel from die {src}: payload version {version} / hidden dtype {dtype} not understood")
    hidden_dtype = _TORCH_DTYPES[dtype]
    hidden_bytes, columns = n * dim * hidden_dtype.itemsize, 4 if flags & 1 else 3
    table_at = _HEADER.size + hidden_bytes + _pad(hidden_bytes)
    if n == 0 or len(payload) != table_at + 4 * columns * n:
        raise ValueError(f"parcel from die {src}: {len(payload)} bytes, but {n} rows of hidden size {dim} "
                         f"({hidden_dtype}) take {table_at + 4 * columns * n}")
    buffer = bytearray(payload)  # one copy: the tensors below share it and are writable
    hidden = torch.frombuffer(buffer, dtype=hidden_dtype, count=n * dim, offset=_HEADER.size) if dim else \
        torch.zeros(0, dtype=hidden_dtype)
    table = torch.frombuffer(buffer, dtype=torch.int32, count=columns * n, offset=table_at).view(columns, n)
    scales = table[3].view(torch.float32) if flags & 1 else None
    return TokenRows(hidden.view(n, dim), table[0], table[1], table[2].view(torch.float32), scales)
