"""PutCoalescer: the puts of one turn of the event loop go out as one, each caller gets its own
results, a failure of the shared put reaches every caller, a cancelled caller harms no other."""
from __future__ import annotations

import asyncio

from cloudmatrix.kvcache.blocks import Block, PutResult
from cloudmatrix.kvcache.coalesce import PutCoalescer


def _blocks(tag: int, n: int) -> list[Block]:
    return [Block(bytes([tag, i]) * 8, "ns", "full", 16, bytes([tag, i])) for i in range(n)]


class Recorder:
    """A pool's put: like a shard, a stream with a malformed block (data b"bad") fails every block."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[list[bytes], list[dict]]] = []
        self.fail, self.gate = fail, asyncio.Event()

    async def __call__(self, blocks, leases):
        self.calls.append(([b.key for b in blocks], list(leases)))
        await self.gate.wait()
        if self.fail:
            raise self.fail
        ok = all(b.data != b"bad" for b in blocks)
        return [PutResult(b.key, ok, ("s",), ("s",) if ok else (), {} if ok else {"s": "INVALID_ARGUMENT"}, (),
                          tuple(lease) if ok else ()) for b, lease in zip(blocks, leases)]


def test_one_turns_puts_are_sent_once_and_answered_per_caller():
    async def main():
        put = Recorder()
        coalescer = PutCoalescer(put)
        groups = [_blocks(t, t + 1) for t in range(3)]
        calls = [asyncio.ensure_future(coalescer.put(g, {"s": f"lease-{t}"})) for t, g in enumerate(groups)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        calls[1].cancel()  # a caller that leaves: the others still get their answers
        put.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        later = asyncio.ensure_future(coalescer.put(_blocks(9, 1), {}))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await coalescer.close()
        return put.calls, groups, results, later

    calls, groups, results, later = asyncio.run(main())
    assert len(calls) == 1 and calls[0][0] == [b.key for g in groups for b in g]  # one put for all three
    assert calls[0][1] == [{"s": f"lease-{t}"} for t, g in enumerate(groups) for _ in g]
    assert [r.key for r in results[0]] == [b.key for b in groups[0]] and results[0][0].leased_on == ("s",)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r.key for r in results[2]] == [b.key for b in groups[2]]
    assert later.cancelled()  # closed before its put went out: the caller is not left waiting


def test_a_failed_shared_put_reaches_every_caller():
    async def main():
        put = Recorder(fail=RuntimeError("shard client broke"))
        coalescer = PutCoalescer(put)
        calls = [asyncio.ensure_future(coalescer.put(_blocks(t, 2), {})) for t in range(2)]
        await asyncio.sleep(0)
        put.gate.set()
        return await asyncio.gather(*calls, return_exceptions=True), len(put.calls)

    results, sends = asyncio.run(main())
    assert sends == 1 and all(isinstance(r, RuntimeError) and "broke" in str(r) for r in results)


def test_one_callers_malformed_block_fails_only_that_callers_put():
    async def main():
        put = Recorder()
        put.gate.set()
        coalescer = PutCoalescer(put)
        bad = [Block(b"\x07" * 16, "ns", "full", 16, b"bad")]
        return await asyncio.gather(coalescer.put(_blocks(1, 2), {"s": "a"}), coalescer.put(bad, {"s": "b"}),
                                    coalescer.put(_blocks(3, 1), {"s": "c"})), put.calls

    (good, bad, other), calls = asyncio.run(main())
    assert len(calls[0][0]) == 4 and not any(r.acknowledged for r in bad)  # the shared stream failed ...
    assert all(r.acknowledged and r.leased_on == ("s",) for r in good + other)  # ... the others put again alone
    assert [len(keys) for keys, _ in calls] == [4, 2, 1, 1]


def test_closing_during_a_callers_own_retry_leaves_no_caller_waiting():
    async def main():
        shared = Recorder()
        shared.gate.set()
        calls, stuck = [], asyncio.Event()

        async def put(blocks, leases):  # the shared stream fails; every retry hangs until closed
            calls.append(len(blocks))
            if len(calls) == 1:
                return await shared(blocks, leases)
            await stuck.wait()

        coalescer = PutCoalescer(put)
        bad = [Block(b"\x07" * 16, "ns", "full", 16, b"bad")]
        waiting = [asyncio.ensure_future(coalescer.put(_blocks(1, 1), {})), asyncio.ensure_future(coalescer.put(bad, {}))]
        while len(calls) < 2:
            await asyncio.sleep(0)
        await coalescer.close()
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5), calls

    results, calls = asyncio.run(main())
    assert calls == [2, 1] and all(isinstance(r, asyncio.CancelledError) for r in results)


def test_nothing_to_put_sends_nothing():
    async def main():
        put = Recorder()
        return await PutCoalescer(put).put([], {}), put.calls

    assert asyncio.run(main()) == ([], [])
