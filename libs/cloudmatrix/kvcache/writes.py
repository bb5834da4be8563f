"""Block writes: each block to its ring replicas, one Put client-stream per shard, all concurrent."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from cloudmatrix.kvcache.blocks import ACK_STATUSES, Block, PutResult, status_message
from cloudmatrix.kvcache.connections import CALL_ERRORS, ShardConnections, describe

DOWN = "shard marked down"


async def put_blocks(conns: ShardConnections, replicas_of: Callable[[bytes], list[str]], blocks: list[Block],
                     write_quorum: int) -> list[PutResult]:
    """One PutResult per block, in order; acknowledged once ``write_quorum`` replicas hold it."""
    replicas = [replicas_of(block.key) for block in blocks]
    errors: list[dict[str, str]] = [{} for _ in blocks]
    plan: dict[str, list[int]] = {}  # shard -> indexes of the blocks it gets
    for i, shards in enumerate(replicas):
        for shard in shards:
            if conns.health.is_up(shard):
                plan.setdefault(shard, []).append(i)
            else:
                errors[i][shard] = DOWN
    outcomes = await asyncio.gather(*(put_on(conns, s, [blocks[i] for i in idx]) for s, idx in plan.items()))
    for (shard, indexes), outcome in zip(plan.items(), outcomes):
        for i, error in zip(indexes, outcome):
            if error is not None:
                errors[i][shard] = error
    return [_result(block, shards, errs, write_quorum) for block, shards, errs in zip(blocks, replicas, errors)]


def _result(block: Block, replicas: list[str], errors: dict[str, str], write_quorum: int) -> PutResult:
    stored = tuple(s for s in replicas if s not in errors)
    return PutResult(block.key, len(stored) >= write_quorum, tuple(replicas), stored, errors)


async def put_on(conns: ShardConnections, shard: str, blocks: list[Block]) -> list[str | None]:
    """Put ``blocks`` on ``shard`` in one stream: per block None (STORED or DUPLICATE) or why not.

    A rejection (checksum, capacity, invalid, conflict) is the shard's answer and is not retried;
    only a failed stream is, by ``ShardConnections.call``, and then the whole stream again
    (blocks already stored come back DUPLICATE).
    """
    messages = [block.to_wire() for block in blocks]
    try:
        reply = await conns.call(shard, lambda client, t: client.put_wire(messages, t))
    except CALL_ERRORS as err:
        return [describe(err)] * len(blocks)
    if len(reply.statuses) != len(blocks):
        return [f"shard answered {len(reply.statuses)} statuses for {len(blocks)} blocks"] * len(blocks)
    return [_outcome(block, status) for block, status in zip(blocks, reply.statuses)]


def _outcome(block: Block, status) -> str | None:
    if status.key != block.key:
        return f"shard answered for key {status.key.hex()} where {block.key.hex()} was sent"
    return None if status.status in ACK_STATUSES else status_message(status)
