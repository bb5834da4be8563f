"""Puts made in one turn of the event loop go out together: one Put stream per shard for all of
them, each caller getting the results of its own blocks. The write-backs of the prompts that
finish in one prefill step all start in the same turn, so 32 of them make 2 Put streams (one per
shard) instead of 64. Every block keeps its own lease (``PutBlock.lease_id`` is per block).

A shared stream shares its fate: a shard aborts a Put stream on a malformed block, failing the
blocks behind it. So a caller whose blocks were not all acknowledged in a shared put has them put
again on their own (blocks are immutable, a re-put is a DUPLICATE that joins the lease again):
one caller's bad block never fails another caller's put."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

from cloudmatrix.kvcache.blocks import Block, PutResult

Put = Callable[[list[Block], Sequence[Mapping[str, str]]], Awaitable[list[PutResult]]]


class PutCoalescer:
    def __init__(self, put: Put) -> None:
        self._put = put
        self._pending: list[tuple[list[Block], list[Mapping[str, str]], asyncio.Future]] = []
        self._sends: set[asyncio.Task[None]] = set()

    async def put(self, blocks: list[Block], lease_ids: Mapping[str, str]) -> list[PutResult]:
        """``blocks`` (each joining the lease ``lease_ids`` names per shard), sent with every other
        put of this turn of the loop; one PutResult per block, in order."""
        if not blocks:
            return []
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._flush)
        future = loop.create_future()
        self._pending.append((blocks, [lease_ids] * len(blocks), future))
        return await future

    async def close(self) -> None:
        for task in self._sends:
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, batch: list[tuple[list[Block], list[Mapping[str, str]], asyncio.Future]]) -> None:
        try:
            await self._answer(batch)
        finally:  # closed (cancelled) meanwhile: so are the puts of callers not yet answered
            for _, _, future in batch:
                if not future.done():
                    future.cancel()

    async def _answer(self, batch: list[tuple[list[Block], list[Mapping[str, str]], asyncio.Future]]) -> None:
        try:
            results = await self._put([b for blocks, _, _ in batch for b in blocks],
                                      [lease for _, leases, _ in batch for lease in leases])
        except Exception as err:  # the callers see what the shared put raised
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        start = 0
        for blocks, leases, future in batch:
            mine, start = results[start:start + len(blocks)], start + len(blocks)
            try:
                if len(batch) > 1 and not all(r.acknowledged or r.only_conflicts for r in mine):
                    mine = await self._put(blocks, leases)  # on its own: another caller's block may be to blame
            except Exception as err:
                if not future.done():
                    future.set_exception(err)
                continue
            if not future.done():  # a caller that was cancelled meanwhile has no one to tell
                future.set_result(mine)
