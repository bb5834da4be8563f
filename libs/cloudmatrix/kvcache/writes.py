"""Block writes: each block to its ring replicas, one Put client-stream per shard, all concurrent."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

from cloudmatrix.kvcache.blocks import ACK_STATUSES, Block, PutResult, Refusal, refusal
from cloudmatrix.kvcache.connections import CALL_ERRORS, ShardConnections, describe

DOWN = "shard marked down"


async def put_blocks(conns: ShardConnections, preference_of: Callable[[bytes], list[str]], replication: int,
                     blocks: list[Block], write_quorum: int,
                     lease_ids: Sequence[Mapping[str, str]] | None = None) -> list[PutResult]:
    """One PutResult per block, in order; acknowledged once ``write_quorum`` shards hold it.

    A block goes to its ``replication`` ring replicas (the head of ``preference_of(key)``, every
    shard in ring order). A replica that is marked down, or found down by this put, is stood in for
    by the next up shard along the ring (a sloppy quorum, as Dynamo's hinted handoff): the block
    still gets ``replication`` copies while a shard is away, and anti-entropy copies it onto its
    replica once that one is back. A shard's refusal (checksum, capacity, conflict) gets no stand-in.

    ``lease_ids``, one mapping per block (shard -> lease id): a block put on a shard joins its
    lease there (``PutResult.leased_on``); a shard without one, e.g. a stand-in, leases nothing."""
    lease_ids = lease_ids or [{}] * len(blocks)
    preferences = [preference_of(block.key) for block in blocks]
    owners = [preference[:replication] for preference in preferences]
    errors = [{s: DOWN for s in replicas if not conns.health.is_up(s)} for replicas in owners]
    stored: list[list[str]] = [[] for _ in blocks]
    conflicts: list[list[str]] = [[] for _ in blocks]
    tried: list[set[str]] = [set() for _ in blocks]
    leased: list[list[str]] = [[] for _ in blocks]
    while plan := _plan(conns, preferences, replication, stored, tried):
        outcomes = await asyncio.gather(*(_put_statuses(conns, s, [blocks[i] for i in idx],
                                                        [lease_ids[i].get(s, "") for i in idx])
                                          for s, idx in plan.items()))
        for (shard, indexes), outcome in zip(plan.items(), outcomes):
            for i, (error, joined) in zip(indexes, outcome):
                if joined:
                    leased[i].append(shard)
                if error is None:
                    stored[i].append(shard)
                else:
                    errors[i][shard] = str(error)
                    if error.conflict:
                        conflicts[i].append(shard)
    rows = zip(blocks, preferences, owners, stored, errors, conflicts, leased)
    return [PutResult(block.key, len(on) >= write_quorum, tuple(replicas), tuple(sorted(on, key=preference.index)),
                      errs, tuple(conflict), tuple(joined))
            for block, preference, replicas, on, errs, conflict, joined in rows]


def _plan(conns: ShardConnections, preferences: list[list[str]], replication: int, stored: list[list[str]],
          tried: list[set[str]]) -> dict[str, list[int]]:
    """shard -> indexes of the blocks to put there next: for each block as many untried up shards,
    in ring order, as it lacks copies (a shard that refused it counts as one: no stand-in)."""
    plan: dict[str, list[int]] = {}
    for i, preference in enumerate(preferences):
        refused = sum(1 for s in tried[i] if s not in stored[i] and conns.health.is_up(s))
        wanted = replication - len(stored[i]) - refused
        for shard in [s for s in preference if s not in tried[i] and conns.health.is_up(s)][:max(0, wanted)]:
            plan.setdefault(shard, []).append(i)
            tried[i].add(shard)
    return plan


async def put_on(conns: ShardConnections, shard: str, blocks: list[Block]) -> list[Refusal | None]:
    """Put ``blocks`` on ``shard`` in one stream: per block None (STORED or DUPLICATE) or why not.

    A rejection (checksum, capacity, invalid, conflict) is the shard's answer and is not retried;
    only a failed stream is, by ``ShardConnections.call``, and then the whole stream again
    (blocks already stored come back DUPLICATE).
    """
    return [error for error, _ in await _put_statuses(conns, shard, blocks, [""] * len(blocks))]


async def _put_statuses(conns: ShardConnections, shard: str, blocks: list[Block], lease_ids: list[str]
                        ) -> list[tuple[Refusal | None, bool]]:
    """``put_on`` with each block joining its lease (``lease_ids``, one per block, "" for none):
    per block (refusal or None, joined)."""
    messages = [block.to_wire(lease_id) for block, lease_id in zip(blocks, lease_ids)]
    try:
        reply = await conns.call(shard, lambda client, t: client.put_wire(messages, t))
    except CALL_ERRORS as err:
        return [(Refusal(describe(err)), False)] * len(blocks)
    if len(reply.statuses) != len(blocks):
        return [(Refusal(f"shard answered {len(reply.statuses)} statuses for {len(blocks)} blocks"), False)] \
            * len(blocks)
    return [(_outcome(block, status), status.leased and status.key == block.key)
            for block, status in zip(blocks, reply.statuses)]


def _outcome(block: Block, status) -> Refusal | None:
    if status.key != block.key:
        return Refusal(f"shard answered for key {status.key.hex()} where {block.key.hex()} was sent")
    return None if status.status in ACK_STATUSES else refusal(status)
