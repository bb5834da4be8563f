"""The Unified-Bus (UB) fabric of CloudMatrix384 as the cost model sees it (PAPERS.md s1, s2).

Topology: die -> NPU (2 dies) -> node (8 NPUs = 16 dies, 7 L1 UB switch chips) -> L2 Clos (7
sub-planes of 16 switches). The Clos is non-blocking (no oversubscription), so the only bandwidth
limit is the die's own 196 GB/s per direction, and the only topology effect is intra- vs inter-node
(< 3% less bandwidth, < 1 us more latency). All-to-all rounds (MoE dispatch / combine) use an
effective per-die bandwidth calibrated on the paper's dispatch/combine table: calibration, not
prediction (docs/costmodel.md). Modeled seconds only.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from cloudmatrix.costmodel.die import check_nonnegative


@dataclasses.dataclass(frozen=True)
class UBSpec:
    dies_per_npu: int = 2                    # 910C = 2 dies (PAPERS.md s1)
    npus_per_node: int = 8                   # PAPERS.md s1
    nodes: int = 48                          # 384 NPUs in 48 nodes (PAPERS.md s1)
    l1_switches_per_node: int = 7            # PAPERS.md s1; descriptive, non-blocking
    l2_subplanes: int = 7                    # PAPERS.md s1; descriptive, non-blocking
    l2_switches_per_subplane: int = 16       # PAPERS.md s1; descriptive, non-blocking
    die_bandwidth: float = 196e9             # bytes/s per die per direction, 7 links x ~28 GB/s (PAPERS.md s1)
    inter_node_bandwidth_loss: float = 0.03  # "< 3%" (PAPERS.md s1); the bound, i.e. the pessimistic end
    inter_node_extra_latency_s: float = 1e-6  # "< 1 us" (PAPERS.md s1); the bound
    die_to_die_latency_s: float = 1.2e-6     # die to die at 512 B (PAPERS.md s1, uncertain); taken as intra-node
    die_to_die_probe_bytes: int = 512        # the message size of that latency figure
    cpu_bandwidth: float = 160e9             # bytes/s a CPU moves over UB (PAPERS.md s1: ~160 GB/s per CPU)

    @property
    def dies_per_node(self) -> int:
        return self.dies_per_npu * self.npus_per_node

    @property
    def total_dies(self) -> int:
        return self.dies_per_node * self.nodes


CLOUDMATRIX384_UB = UBSpec()


class DieLocation(NamedTuple):
    node: int        # 0 .. nodes-1
    npu: int         # NPU within its node, 0 .. 7
    die_in_npu: int  # 0 or 1


def die_location(die: int, spec: UBSpec = CLOUDMATRIX384_UB) -> DieLocation:
    """Global die id -> (node, NPU within the node, die within the NPU); ids fill nodes in order."""
    if not 0 <= die < spec.total_dies:
        raise ValueError(f"die={die} is not in [0, {spec.total_dies})")
    node, in_node = divmod(die, spec.dies_per_node)
    return DieLocation(node, *divmod(in_node, spec.dies_per_npu))


def _inter_node(src: int, dst: int, spec: UBSpec) -> bool:
    return die_location(src, spec).node != die_location(dst, spec).node


def _intra_node_latency_s(spec: UBSpec) -> float:
    """The 1.2 us figure includes serializing its 512 B probe; keep only the fixed part."""
    return spec.die_to_die_latency_s - spec.die_to_die_probe_bytes / spec.die_bandwidth


def link_latency_s(src: int, dst: int, spec: UBSpec = CLOUDMATRIX384_UB) -> float:
    """One-way latency of a message from die src to die dst (0 for the same die: nothing crosses UB)."""
    inter = _inter_node(src, dst, spec)
    if src == dst:
        return 0.0
    return _intra_node_latency_s(spec) + (spec.inter_node_extra_latency_s if inter else 0.0)


def link_bandwidth(src: int, dst: int, spec: UBSpec = CLOUDMATRIX384_UB) -> float:
    """Bytes/s one die can push to another (the Clos is non-blocking: the die's port is the limit)."""
    loss = spec.inter_node_bandwidth_loss if _inter_node(src, dst, spec) else 0.0
    return spec.die_bandwidth * (1.0 - loss)


def transfer_s(src: int, dst: int, nbytes: int, spec: UBSpec = CLOUDMATRIX384_UB) -> float:
    """One point-to-point transfer on an idle fabric. src == dst costs 0 here: a local copy never
    crosses UB (cost it as an HBM op with ops.vector_s if it matters)."""
    check_nonnegative(nbytes=nbytes)
    if src == dst:
        die_location(src, spec)  # still validates the id
        return 0.0
    return link_latency_s(src, dst, spec) + nbytes / link_bandwidth(src, dst, spec)


def bulk_collective_s(busiest_bytes: float, dies: int, spec: UBSpec = CLOUDMATRIX384_UB) -> float:
    """A bulk collective (all-gather, all-to-all of large contiguous buffers, moved by the DMA
    engines rather than per token on the vector cores) among ``dies`` dies 0..dies-1: the busiest
    die's bytes at its UB port rate (less the inter-node loss when the group spans nodes), plus the
    slowest link's latency (assumption: no paper figure for such collectives; docs/simulator.md)."""
    check_nonnegative(busiest_bytes=busiest_bytes)
    if dies < 2:
        return 0.0
    spans_nodes = dies > spec.dies_per_node
    bandwidth = spec.die_bandwidth * (1.0 - spec.inter_node_bandwidth_loss if spans_nodes else 1.0)
    return _round_latency_s(range(dies), spec) + busiest_bytes / bandwidth


def pool_transfer_s(nbytes: int, spec: UBSpec = CLOUDMATRIX384_UB) -> float:
    """KV blocks read from the EMS pool (CPU DRAM) into a die's HBM over UB (context caching):
    the pool's memory is taken to sit on another node (the worst case: the inter-node latency and
    bandwidth loss), served by one CPU at its UB bandwidth, below the die's port (assumption: the
    paper gives no read bandwidth of the pool itself). 0 for no bytes."""
    check_nonnegative(nbytes=nbytes)
    if not nbytes:
        return 0.0
    rate = min(spec.cpu_bandwidth, spec.die_bandwidth) * (1.0 - spec.inter_node_bandwidth_loss)
    return link_latency_s(0, spec.dies_per_node, spec) + nbytes / rate


def cached_transfer_model(spec: UBSpec = CLOUDMATRIX384_UB) -> Callable[[int, int, int], float]:
    """``transfer_s`` with each die pair's latency and bandwidth computed once: for a router that
    models every parcel it moves."""
    links: dict[tuple[int, int], tuple[float, float]] = {}

    def model(src: int, dst: int, nbytes: int) -> float:
        link = links.get((src, dst))
        if link is None:
            if src == dst:
                return transfer_s(src, dst, nbytes, spec)
            link = links[(src, dst)] = (link_latency_s(src, dst, spec), link_bandwidth(src, dst, spec))
        check_nonnegative(nbytes=nbytes)
        return link[0] + nbytes / link[1]

    return model


# ---- all-to-all rounds: dispatch and combine ----------------------------------------------------

SCALE_BYTES = 4           # fp32 per-token scale sent with the INT8 row (PAPERS.md s2)
ROUTING_META_BYTES = 12   # int32 token index + int32 expert id + fp32 router weight: what our
                          # dispatch rows carry (cloudmatrix.moe.dispatch.TokenRows); assumption
                          # for the paper, whose metadata size is not reported
KINDS = ("dispatch", "combine")


@dataclasses.dataclass(frozen=True)
class DispatchCombineRow:
    """One row of the dispatch/combine table. bandwidth = bytes a rank sends / latency."""

    op: str
    ep: int
    latency_s: float
    bandwidth: float  # bytes/s

    @property
    def latency_us(self) -> float:
        return self.latency_s * 1e6

    @property
    def bandwidth_gbps(self) -> float:
        return self.bandwidth / 1e9


def paper_dispatch_combine_table() -> tuple[DispatchCombineRow, ...]:
    """CloudMatrix384 rows of PAPERS.md s2 (batch 128 tokens per rank, DeepSeek-V3 hidden 7,168)."""
    return (DispatchCombineRow("dispatch", 8, 116e-6, 71e9), DispatchCombineRow("dispatch", 256, 152e-6, 54e9),
            DispatchCombineRow("combine", 8, 118e-6, 131e9), DispatchCombineRow("combine", 256, 149e-6, 103e9))


def row_bytes(kind: str, hidden: int = 7168, int8_dispatch: bool = True) -> int:
    """Bytes of one (token, expert) row: dispatch = INT8 hidden + scale + routing metadata (or BF16
    hidden + metadata); combine = the expert's BF16 output row."""
    check_nonnegative(hidden=hidden)
    if kind == "combine":
        return 2 * hidden
    if kind != "dispatch":
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    return (hidden + SCALE_BYTES if int8_dispatch else 2 * hidden) + ROUTING_META_BYTES


def uniform_matrix(ep: int, rows_per_rank: int, bytes_per_row: int) -> list[list[int]]:
    """Every rank spreads its rows evenly over all ranks (itself included); a remainder of
    rows_per_rank % ep goes one row each to the next ranks after the sender, so loads stay even."""
    check_nonnegative(rows_per_rank=rows_per_rank, bytes_per_row=bytes_per_row)
    if ep < 1:
        raise ValueError(f"ep={ep} must be >= 1")
    share, extra = divmod(rows_per_rank, ep)
    return [[bytes_per_row * (share + ((dst - src) % ep < extra)) for dst in range(ep)] for src in range(ep)]


def _busiest_bytes(matrix: Sequence[Sequence[int]]) -> int:
    """The most bytes any die must push out or take in over UB (self-traffic stays on the die)."""
    ep = len(matrix)
    sent = [sum(matrix[i]) - matrix[i][i] for i in range(ep)]
    received = [sum(matrix[s][d] for s in range(ep)) - matrix[d][d] for d in range(ep)]
    return max(sent + received)


def _round_latency_s(dies: Sequence[int], spec: UBSpec) -> float:
    """Every die sends a frame (maybe empty) to every peer, so the slowest pair bounds the round."""
    if len(dies) < 2:
        return 0.0
    spans_nodes = len({die_location(d, spec).node for d in dies}) > 1
    return _intra_node_latency_s(spec) + (spec.inter_node_extra_latency_s if spans_nodes else 0.0)


@functools.cache
def _calibrated_bandwidth() -> dict[tuple[str, int], float]:
    """Effective per-die bytes/s that make the model hit each paper latency exactly (uniform routing,
    128 tokens x top-8 rows per rank, ranks on dies 0..EP-1)."""
    out = {}
    for row in paper_dispatch_combine_table():
        matrix = uniform_matrix(row.ep, 128 * 8, row_bytes(row.op))
        fixed = _round_latency_s(range(row.ep), CLOUDMATRIX384_UB)
        out[row.op, row.ep] = _busiest_bytes(matrix) / (row.latency_s - fixed)
        assert out[row.op, row.ep] < CLOUDMATRIX384_UB.die_bandwidth, "calibrated above the UB port rate"
    return out


def effective_bandwidth(kind: str, ep: int) -> float:
    """Calibrated bytes/s per die for an all-to-all round: linear in log(EP) between EP8 and EP256,
    clamped outside that range."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    if ep < 1:
        raise ValueError(f"ep={ep} must be >= 1")
    low, high = _calibrated_bandwidth()[kind, 8], _calibrated_bandwidth()[kind, 256]
    t = min(max((math.log(ep) - math.log(8)) / (math.log(256) - math.log(8)), 0.0), 1.0)
    return low + t * (high - low)


def round_s(bytes_matrix: Sequence[Sequence[int]], kind: str, *, dies: Sequence[int] | None = None,
            spec: UBSpec = CLOUDMATRIX384_UB) -> float:
    """Modeled time of one all-to-all round; bytes_matrix[src][dst] over EP ranks, rank i on
    dies[i] (default die i). Done when the busiest die has pushed its bytes out and taken its bytes
    in (UB is full duplex, so the larger of the two), at the calibrated effective bandwidth, plus
    the slowest link's latency."""
    ep = len(bytes_matrix)
    for i, row in enumerate(bytes_matrix):
        if len(row) != ep:
            raise ValueError(f"bytes_matrix must be square: row {i} has {len(row)} entries, expected {ep}")
        for j, b in enumerate(row):
            check_nonnegative(**{f"bytes_matrix[{i}][{j}]": b})
    dies = list(range(ep)) if dies is None else list(dies)
    if len(dies) != ep or len(set(dies)) != ep:
        raise ValueError(f"dies must name {ep} distinct dies, got {dies}")
    if ep < 2:
        return 0.0
    return _round_latency_s(dies, spec) + _busiest_bytes(bytes_matrix) / effective_bandwidth(kind, ep)


def busiest_round_s(busiest_bytes: float, kind: str, ep: int, spec: UBSpec = CLOUDMATRIX384_UB) -> float:
    """``round_s`` from the busiest die's bytes alone (the larger of what it sends and receives),
    for EP ranks on dies 0..EP-1: what a simulator of a whole deployment needs without building
    an EP x EP matrix."""
    check_nonnegative(busiest_bytes=busiest_bytes)
    if ep < 2:
        return 0.0
    return _first_dies_latency_s(ep, spec) + busiest_bytes / effective_bandwidth(kind, ep)


@functools.cache
def _first_dies_latency_s(ep: int, spec: UBSpec) -> float:
    return _round_latency_s(range(ep), spec)


def modeled_dispatch_combine(ep: int, tokens_per_rank: int = 128, hidden: int = 7168, top_k: int = 8,
                             int8_dispatch: bool = True) -> tuple[DispatchCombineRow, DispatchCombineRow]:
    """The paper's benchmark recomputed by the model: uniform routing, one row per (token, expert),
    ranks on dies 0..EP-1. Bandwidth is reported as the paper does: all rows a rank sends / latency."""
    check_nonnegative(tokens_per_rank=tokens_per_rank, top_k=top_k)
    rows = []
    for kind in KINDS:
        size = row_bytes(kind, hidden, int8_dispatch)
        latency = round_s(uniform_matrix(ep, tokens_per_rank * top_k, size), kind)
        sent = tokens_per_rank * top_k * size
        rows.append(DispatchCombineRow(kind, ep, latency, sent / latency if latency else 0.0))
    return rows[0], rows[1]
