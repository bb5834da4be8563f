"""The decode and prefill cores over the fake driver (tests/fake_dies.py) and a fake pool, in
milliseconds: admission (the prompt's KV fetched only then, the lease released after), stop
rules, cancel, a finish on the first token, preemption."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from cloudmatrix.instance.loop import LoopSettings, StepLoop
from cloudmatrix.instance.scheduler import SchedulerLimits
from cloudmatrix.kvcache import Lease, PutResult
from cloudmatrix.rpc.tensor_codec import encode_tensor
from cloudmatrix.sampling_params import FinishReason, SamplingParams
from services.decode.core import DecodeCore, DecodeRequest
from services.prefill.core import PrefillCore, PrefillSettings
from tests.fake_dies import FakeDriver, next_token, prefix_kv, reference

BS, EOS, VOCAB = 4, 2, 100


@dataclasses.dataclass
class _Stored:
    data: bytes


class FakePool:
    """The pool calls the cores make: blocks by key, and leases released."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, _Stored] = {}
        self.reads: list[list[bytes]] = []
        self.released: list[Lease] = []

    def hold(self, request_id: str, tokens: list[int]) -> list[bytes]:
        keys = [f"{request_id}-{i}".encode() for i in range(-(-len(tokens) // BS))]
        for key, kv in zip(keys, prefix_kv(tokens, BS)):
            self.blocks[key] = _Stored(encode_tensor(kv).SerializeToString())
        return keys

    async def get_blocks(self, keys, release: Lease | None = None):
        """As KvPoolClient.get_blocks: ``release`` ends with the read."""
        self.reads.append(list(keys))
        if release is not None:
            self.released.append(release)
        return {k: self.blocks.get(k) for k in keys}

    async def release(self, lease: Lease) -> None:
        self.released.append(lease)

    async def lookup_and_lease(self, keys, ttl_s: float):
        """As KvPoolClient.lookup_and_lease, on one shard."""
        present = [key in self.blocks for key in keys]
        return present, Lease({"shard-0": f"lease-{len(self.blocks)}-{len(self.released)}"}, tuple(present), ttl_s)

    async def put_blocks(self, blocks, lease: Lease | None = None):
        for block in blocks:
            self.blocks.setdefault(block.key, _Stored(block.data))
        return [PutResult(b.key, True, ("shard-0",), ("shard-0",), {}, (), tuple(lease.lease_ids if lease else ()))
                for b in blocks]


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 90 + 3 for i in range(n)]


async def _started(blocks: int = 8, dies: int = 2) -> StepLoop:
    driver = FakeDriver(dies, blocks, BS)
    loop = StepLoop(driver, driver.load, SchedulerLimits(max_running=8, max_waiting=8, max_step_tokens=32),
                    LoopSettings("core-test", probe_interval_s=3600.0))
    await loop.start()
    return loop


def _decode_request(pool: FakePool, rid: str, prompt: list[int], params: SamplingParams) -> DecodeRequest:
    """What the prefill hands the decode: the prompt's blocks in the pool, leased, and its first token."""
    return DecodeRequest(rid, prompt, next_token(prompt), pool.hold(rid, prompt), params,
                         Lease({"shard-0": rid}, (True,), 60.0))


async def _collect(core: DecodeCore, req: DecodeRequest) -> tuple[list[int], FinishReason]:
    tokens, reason = [req.first_token], None
    async for event in core.decode(req):
        tokens += event.token_ids
        reason = event.finish_reason
    return tokens, reason


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_decode_continues_the_prefill_token_for_token_and_preempts_without_loss():
    async def scenario():
        loop, pool = await _started(blocks=6), FakePool()
        core = DecodeCore(loop, pool, EOS, VOCAB, context_limit=64, chunk_tokens=8)
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        requests = [_decode_request(pool, f"d{i}", _prompt(i, 9), params) for i in range(6)]
        results = await asyncio.gather(*(_collect(core, r) for r in requests))
        preemptions, free = loop.scheduler.preemptions, loop.scheduler.blocks.free_per_die
        await loop.stop()
        return requests, results, pool, preemptions, free

    requests, results, pool, preemptions, free = run(scenario())
    for req, (tokens, reason) in zip(requests, results):
        assert tokens == reference(req.prompt_token_ids, 12) and reason is FinishReason.LENGTH
    assert preemptions > 0 and free == [6, 6]
    assert sorted(lease.lease_ids["shard-0"] for lease in pool.released) == [r.request_id for r in requests]  # once each


def test_decode_fetches_the_prompt_only_when_admitted():
    async def scenario():
        loop, pool = await _started(blocks=4, dies=1), FakePool()
        core = DecodeCore(loop, pool, EOS, VOCAB, context_limit=64)
        loop.driver.gate, loop.driver.entered = asyncio.Event(), asyncio.Event()
        first = asyncio.ensure_future(_collect(core, _decode_request(pool, "a", _prompt(1, 9),
                                                                     SamplingParams(max_tokens=6, ignore_eos=True))))
        await loop.driver.entered.wait()  # "a" holds 4 of the die's 4 blocks and steps
        second = asyncio.ensure_future(_collect(core, _decode_request(pool, "b", _prompt(2, 9),
                                                                      SamplingParams(max_tokens=3, ignore_eos=True))))
        await asyncio.sleep(0.01)
        reads_while_waiting = [keys for keys in pool.reads if keys[0].startswith(b"b")]
        loop.driver.gate.set()
        results = await asyncio.gather(first, second)
        await loop.stop()
        return reads_while_waiting, pool.reads, results

    waiting_reads, reads, (a, b) = run(scenario())
    assert waiting_reads == [] and sum(keys[0].startswith(b"b") for keys in reads) == 1
    assert a[0] == reference(_prompt(1, 9), 6) and b[0] == reference(_prompt(2, 9), 3)


def test_decode_stops_on_the_first_token_a_stop_token_or_a_cancel():
    async def scenario():
        loop, pool = await _started(), FakePool()
        core = DecodeCore(loop, pool, EOS, VOCAB, context_limit=64)
        prompt = _prompt(3, 6)
        first = next_token(prompt)
        ends_at_once = await _collect(core, _decode_request(pool, "s", prompt,
                                                            SamplingParams(max_tokens=9, stop_token_ids=(first,))))
        third = reference(prompt, 3)[2]
        stopped = await _collect(core, _decode_request(pool, "t", prompt,
                                                       SamplingParams(max_tokens=9, stop_token_ids=(third,))))
        cancelled = []
        async for event in core.decode(_decode_request(pool, "c", prompt, SamplingParams(max_tokens=20,
                                                                                         ignore_eos=True))):
            cancelled.append(event)
            if len(cancelled) == 2:
                assert core.cancel("c")
        free = loop.scheduler.blocks.free_per_die
        await loop.stop()
        return ends_at_once, stopped, cancelled, pool, free

    ends_at_once, stopped, cancelled, pool, free = run(scenario())
    assert ends_at_once == ([next_token(_prompt(3, 6))], FinishReason.STOP)
    assert stopped == (reference(_prompt(3, 6), 3), FinishReason.STOP)
    assert cancelled[-1].finish_reason is FinishReason.CANCELLED and len(cancelled) < 20
    assert [lease.lease_ids["shard-0"] for lease in pool.released] == ["s", "t", "c"] and free == [8, 8]


def test_prefill_gives_the_first_token_in_chunks_and_a_cancel_frees_its_blocks():
    async def scenario():
        loop = await _started()
        core = PrefillCore(loop, None, PrefillSettings("ns", BS, chunk_tokens=3, vocab_size=VOCAB, context_limit=64))
        results = await asyncio.gather(*(core.prefill(f"p{i}", _prompt(i, 11), SamplingParams(), use_cache=True)
                                         for i in range(4)))
        sizes = list(loop.driver.step_sizes)
        loop.driver.gate, loop.driver.entered = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(core.prefill("gone", _prompt(9, 11), SamplingParams(), use_cache=True))
        await loop.driver.entered.wait()
        task.cancel()
        loop.driver.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        while loop.scheduler.requests:
            await asyncio.sleep(0)
        free = loop.scheduler.blocks.free_per_die
        await loop.stop()
        return results, sizes, free

    results, sizes, free = run(scenario())
    assert [r.first_token for r in results] == [reference(_prompt(i, 11), 1)[0] for i in range(4)]
    assert all(r.computed_tokens == 11 and r.cached_tokens == 0 for r in results)
    assert max(sizes) == 4 and len(sizes) == 4  # 11 tokens in chunks of 3: four steps, all four prompts in each
    assert free == [8, 8]


def test_prefill_leases_its_prompt_for_the_decode_and_a_cancelled_one_gives_the_lease_back():
    """The survey's lease covers the cached blocks and, joined by the Puts, the new ones; a prefill
    cancelled after its survey releases it (no decode will read the blocks)."""
    async def scenario():
        loop, pool = await _started(), FakePool()
        core = PrefillCore(loop, pool, PrefillSettings("ns", BS, chunk_tokens=3, vocab_size=VOCAB, context_limit=64))
        first = await core.prefill("a", _prompt(1, 11), SamplingParams(max_tokens=8), use_cache=True)
        again = await core.prefill("b", _prompt(1, 10), SamplingParams(max_tokens=8), use_cache=True)
        loop.driver.gate, loop.driver.entered = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(core.prefill("gone", _prompt(9, 11), SamplingParams(max_tokens=8), use_cache=True))
        await loop.driver.entered.wait()
        task.cancel()
        loop.driver.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await loop.stop()
        return first, again, pool

    first, again, pool = run(scenario())
    assert first.cached_tokens == 0 and first.lease.leased == (True, True, True)  # 2 full blocks + the tail
    assert again.cached_tokens == 8 and again.lease.leased == (True, True, True)  # 2 cached, its own tail new
    assert [lease.lease_ids for lease in pool.released] == [{"shard-0": "lease-4-0"}]  # the cancelled one's


def test_prompts_finishing_in_one_step_are_read_back_in_one_call_per_die_each_with_its_own_kv():
    async def scenario():
        loop, pool = await _started(blocks=16), FakePool()
        core = PrefillCore(loop, pool, PrefillSettings("ns", BS, chunk_tokens=64, vocab_size=VOCAB, context_limit=64))
        prompts = [_prompt(20 + i, 5 + i) for i in range(4)]  # 26 tokens: one step (max_step_tokens 32)
        results = await asyncio.gather(*(core.prefill(f"p{i}", p, SamplingParams(max_tokens=4), use_cache=True)
                                         for i, p in enumerate(prompts)))
        reads, steps = list(loop.driver.block_reads), loop.driver.forwards
        await loop.stop()
        return prompts, results, pool, reads, steps

    prompts, results, pool, reads, steps = run(scenario())
    assert steps == 1 and sorted(die for die, _ in reads) == [0, 1]  # one step, one read per die
    assert sum(n for _, n in reads) == sum(-(-len(p) // BS) for p in prompts)
    for prompt, result in zip(prompts, results):  # every block in the pool holds its own prompt's tokens
        stored = [pool.blocks[k].data for k in result.keys.all]
        assert stored == [encode_tensor(kv).SerializeToString() for kv in prefix_kv(prompt, BS)]
