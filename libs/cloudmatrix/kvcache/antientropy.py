"""Anti-entropy: make every up replica of every block hold it, without waiting for a read.

Read repair (reads.py) fixes a replica when a read finds it missing; a block nobody reads again
stays under-replicated. A pass lists each up shard's keys (ListKeys), works out which of the
keys' other up replicas lack them (Lookup), and copies each missing block from a replica that has
it (Get, checksum-verified, then Put). The pool runs a pass for a shard when it comes back up
(a restarted shard, emptied or stale), and on request (``KvPoolClient.anti_entropy``).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

from cloudmatrix.kvcache.connections import CALL_ERRORS, ShardConnections, describe
from cloudmatrix.kvcache.reads import get_on
from cloudmatrix.kvcache.writes import put_on

log = logging.getLogger(__name__)
BATCH = 256  # keys per Lookup / Get / Put


async def run_pass(conns: ShardConnections, shards: list[str], replicas: Callable[[bytes], list[str]],
                   targets: set[str] | None = None) -> int:
    """One pass over the up ``shards``: blocks copied to the replicas (in ``targets``, default
    every up shard) that lacked them. A shard that fails mid-pass is skipped, not fatal."""
    up = conns.health.up(shards)
    targets = set(up) if targets is None else targets & set(up)
    wanted: dict[str, dict[bytes, str]] = defaultdict(dict)  # target -> key -> a source holding it
    for source in up:
        try:
            keys = await conns.call(source, lambda client, t: client.all_keys())
        except CALL_ERRORS as err:
            log.warning("anti-entropy: cannot list kvcache shard %s: %s", source, describe(err))
            continue
        for key in keys:
            for target in replicas(key):
                if target != source and target in targets:
                    wanted[target].setdefault(key, source)
    copied = 0
    for target, sources in wanted.items():
        copied += await _fill(conns, target, sources)
    if copied:
        log.info("anti-entropy: copied %d blocks to %s", copied, ", ".join(sorted(wanted)))
    return copied


async def _fill(conns: ShardConnections, target: str, sources: dict[bytes, str]) -> int:
    keys, copied = list(sources), 0
    for start in range(0, len(keys), BATCH):
        batch = keys[start:start + BATCH]
        try:
            present, _ = await conns.call(target, lambda client, t: client.lookup(batch, t))
        except CALL_ERRORS as err:
            log.warning("anti-entropy: cannot look up on kvcache shard %s: %s", target, describe(err))
            return copied
        by_source: dict[str, list[bytes]] = defaultdict(list)
        for key, there in zip(batch, present):
            if not there:
                by_source[sources[key]].append(key)
        for source, missing in by_source.items():
            blocks = [b for b in (await get_on(conns, source, missing)).values() if b is not None]
            errors = await put_on(conns, target, blocks)
            copied += sum(error is None for error in errors)
    return copied
