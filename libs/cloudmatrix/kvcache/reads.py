"""Block reads: replicas asked in ring order with fallback, client-side checksums, read repair.

Round k sends, per shard, one Get with every still-unresolved key whose k-th up replica it is,
all shards concurrently. A key is resolved when a replica returns it intact; a miss, an error or
a corrupt copy moves it on to its next up replica; after its last replica it is a miss (None).

Read repair: when a key is found on a later replica, every earlier replica that answered "not
found" gets the block written back. Repairs run in the background (a read never waits for
them); ``Repairs.drain()`` awaits the ones in flight.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import zlib
from collections.abc import Callable

from cloudmatrix.kvcache.blocks import FetchedBlock
from cloudmatrix.kvcache.connections import CALL_ERRORS, ShardConnections, describe
from cloudmatrix.kvcache.health import ShardHealth
from cloudmatrix.kvcache.writes import put_on
from cloudmatrix.rpc.protowire import LEN, WireError, fields
from cmx.kvcache.v1 import kvcache_pb2

log = logging.getLogger(__name__)


class Repairs:
    """Read-repair Puts in flight, and how many stored since the last ``drain``."""

    def __init__(self, conns: ShardConnections) -> None:
        self._conns = conns
        self._tasks: set[asyncio.Task[None]] = set()
        self._stored = 0

    def schedule(self, shard: str, block: FetchedBlock) -> None:
        if self._conns.health.is_up(shard):
            task = asyncio.create_task(self._repair(shard, block))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self) -> int:
        """Wait for every repair in flight (and any they start); the count stored since the last drain."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))
        stored, self._stored = self._stored, 0
        return stored

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _repair(self, shard: str, block: FetchedBlock) -> None:
        [error] = await put_on(self._conns, shard, [block])
        if error is None:
            self._stored += 1
        else:
            log.warning("read repair of block %s on kvcache shard %s failed: %s", block.key.hex(), shard, error)


async def get_blocks(conns: ShardConnections, replicas_of: Callable[[bytes], list[str]], keys: list[bytes],
                     repairs: Repairs, release: dict[str, str] | None = None,
                     owners: Callable[[bytes], list[str]] | None = None) -> dict[bytes, FetchedBlock | None]:
    """Each distinct key -> its block from the first shard in ``replicas_of`` that has it intact,
    or None. Read repair writes it back to the earlier shards that missed it, only those among
    ``owners(key)`` when given (the key's replicas, when the walk goes on past them).

    ``release`` (shard -> lease id): each shard read from ends that lease with its Get, and the
    shards that answered are taken out of the dict (the caller releases what is left)."""
    release = {} if release is None else release
    keys = list(dict.fromkeys(keys))
    found: dict[bytes, FetchedBlock | None] = dict.fromkeys(keys)
    replicas = {key: replicas_of(key) for key in keys}
    cursor = dict.fromkeys(keys, 0)  # index of the next replica to consider, per key
    missed: dict[bytes, list[str]] = {key: [] for key in keys}  # replicas that answered "not found"
    pending = keys
    while plan := _next_round(conns.health, replicas, cursor, pending):
        answers = await asyncio.gather(*(get_on(conns, shard, ks, release.get(shard, "")) for shard, ks in plan.items()))
        pending = []
        for (shard, ks), answer in zip(plan.items(), answers):
            if answer:  # it answered: the lease named with its Get has ended
                release.pop(shard, None)
            for key in ks:
                block = answer.get(key)
                if block is not None:
                    found[key] = block
                    for earlier in missed[key]:
                        if owners is None or earlier in owners(key):
                            repairs.schedule(earlier, block)
                    continue
                if key in answer:
                    missed[key].append(shard)
                pending.append(key)
    return found


def _next_round(health: ShardHealth, replicas: dict[bytes, list[str]], cursor: dict[bytes, int],
                pending: list[bytes]) -> dict[str, list[bytes]]:
    """shard -> the pending keys whose next up replica it is; advances each key's cursor."""
    plan: dict[str, list[bytes]] = {}
    for key in pending:
        shards = replicas[key]
        while cursor[key] < len(shards) and not health.is_up(shards[cursor[key]]):
            cursor[key] += 1
        if cursor[key] < len(shards):
            plan.setdefault(shards[cursor[key]], []).append(key)
            cursor[key] += 1
    return plan


async def get_on(conns: ShardConnections, shard: str, keys: list[bytes], release: str = ""
                 ) -> dict[bytes, FetchedBlock | None]:
    """key -> intact block, or None for "not found"; keys left out had no usable answer. The
    shard ends lease ``release`` (when given) once it has read them."""
    async def attempt(client, timeout_s: float) -> list[WireReply]:
        return [WireReply.parse(raw) for raw in await client.get_wire(keys, timeout_s, [release] if release else ())]

    try:
        replies = await conns.call(shard, attempt)
    except WireError as err:
        log.warning("kvcache shard %s answered a malformed GetReply: %s", shard, err)
        return {}
    except CALL_ERRORS as err:
        log.warning("Get of %d blocks from kvcache shard %s failed: %s", len(keys), shard, describe(err))
        return {}
    wanted = set(keys)
    answer: dict[bytes, FetchedBlock | None] = {}
    for reply in replies:
        if reply.key in wanted:
            answer.update(decode_reply(reply, shard))
    return answer


@dataclasses.dataclass(frozen=True)
class WireReply:
    """A GetReply read on the wire (the data is copied once, out of the received bytes)."""

    key: bytes = b""
    found: bool = False
    data: bytes = b""
    checksum: int = 0
    kind: int = 0
    num_tokens: int = 0
    namespace: str = ""

    @classmethod
    def parse(cls, raw: bytes) -> WireReply:
        values = {}
        for number, kind, value in fields(memoryview(raw)):
            name = _GET_REPLY_FIELDS.get(number)
            if name is None:
                continue  # a field this client does not know
            expected = _LEN_FIELDS.get(name)
            if (kind == LEN) != (expected is not None):
                raise WireError(f"GetReply field {name}: wire type {kind} is wrong")
            values[name] = bytes(value) if expected is bytes else str(value, "utf-8") if expected is str else value
        values["found"] = bool(values.get("found", False))
        return cls(**values)


_GET_REPLY_FIELDS = {f.number: f.name for f in kvcache_pb2.GetReply.DESCRIPTOR.fields}
_LEN_FIELDS = {"key": bytes, "data": bytes, "namespace": str}


def decode_reply(reply: WireReply, shard: str) -> dict[bytes, FetchedBlock | None]:
    if not reply.found:
        return {reply.key: None}
    if zlib.crc32(reply.data) != reply.checksum:
        log.warning("block %s from kvcache shard %s fails its CRC-32; trying the next replica",
                    reply.key.hex(), shard)
        return {}
    try:
        return {reply.key: FetchedBlock.from_reply(reply, shard)}
    except ValueError as err:
        log.warning("block %s from kvcache shard %s is malformed (%s)", reply.key.hex(), shard, err)
        return {}
