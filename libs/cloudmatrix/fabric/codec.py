"""TokenRows <-> fabric frames (protobuf with raw tensor bytes)."""
from __future__ import annotations

from cloudmatrix.moe.dispatch import TokenRows
from cloudmatrix.rpc.tensor_codec import decode_tensor, encode_tensor
from cmx.common.v1 import common_pb2
from cmx.fabric.v1 import fabric_pb2

ROUND_KINDS = {"dispatch": common_pb2.ROUND_KIND_DISPATCH, "combine": common_pb2.ROUND_KIND_COMBINE}


def round_id(step: int, layer: int, microbatch: int, kind: str) -> common_pb2.RoundId:
    return common_pb2.RoundId(step=step, layer=layer, microbatch=microbatch, kind=ROUND_KINDS[kind])


def round_key(r: common_pb2.RoundId) -> tuple[int, int, int, int]:
    return r.step, r.layer, r.microbatch, r.kind


def to_frame(src: int, dst: int, rid: common_pb2.RoundId, rows: TokenRows | None) -> fabric_pb2.Frame:
    if rows is None or len(rows) == 0:
        return fabric_pb2.Frame(src_die=src, dst_die=dst, round=rid, empty=True)
    payload = fabric_pb2.TokenPayload(hidden=encode_tensor(rows.hidden), token_index=encode_tensor(rows.token_index),
                                      expert_ids=encode_tensor(rows.expert_ids), weights=encode_tensor(rows.weights))
    if rows.scales is not None:
        payload.scales.CopyFrom(encode_tensor(rows.scales))
    return fabric_pb2.Frame(src_die=src, dst_die=dst, round=rid, tokens=payload)


def from_frame(frame: fabric_pb2.Frame) -> TokenRows | None:
    """The rows a frame carries; None for an empty frame. Malformed tensors raise ValueError."""
    if frame.WhichOneof("body") != "tokens":
        return None
    p = frame.tokens
    scales = decode_tensor(p.scales, "scales") if p.HasField("scales") else None
    rows = TokenRows(decode_tensor(p.hidden, "hidden"), decode_tensor(p.token_index, "token_index"),
                     decode_tensor(p.expert_ids, "expert_ids"), decode_tensor(p.weights, "weights"), scales)
    n = len(rows)
    if any(t.shape[0] != n for t in (rows.token_index, rows.expert_ids, rows.weights)):
        raise ValueError(f"frame from die {frame.src_die}: per-row tensors disagree with hidden's {n} rows")
    return rows
