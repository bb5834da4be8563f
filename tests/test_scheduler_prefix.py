"""Sequences between the scheduler, the driver and the dies (fake driver, milliseconds): a pooled
prefix fetched on admission and again after a preemption, the dies told which sequences ended,
and what the driver sends a die for a sequence once and at every step."""
from __future__ import annotations

import asyncio

import pytest

from cloudmatrix.instance.driver import InstanceDriver
from cloudmatrix.instance.scheduler import SchedulerLimits
from cloudmatrix.instance.step import ScheduledChunk
from tests.fake_dies import pooled_prefix, reference
from tests.test_scheduler import BS, Harness, _prompt, _request, run


def test_a_pooled_prefix_is_fetched_when_blocks_are_free_not_while_waiting():
    async def scenario():
        h = Harness(dies=1, blocks=4, limits=SchedulerLimits(max_running=8, max_waiting=8, max_step_tokens=16))
        await h.loop.start()
        h.driver.gate, h.driver.entered = asyncio.Event(), asyncio.Event()
        big = _request("big", _prompt(0, 9), 6)  # 15 tokens: every block of the die
        h.submit(big)
        await h.driver.entered.wait()            # big runs; the next request cannot fit yet
        waiter = _request("w", _prompt(1, 9), 3, cached=8)
        h.submit(waiter)
        await asyncio.sleep(0)
        fetched_while_waiting = list(waiter.prefix.fetches)
        h.driver.gate.set()
        results = await asyncio.gather(h.collect(big), h.collect(waiter))
        await h.loop.stop()
        return fetched_while_waiting, waiter.prefix.fetches, results

    fetched_while_waiting, fetches, (big, waiter) = run(scenario())
    assert fetched_while_waiting == [] and fetches == [2]  # once, on admission, both blocks
    assert big == (reference(_prompt(0, 9), 6), "length") and waiter == (reference(_prompt(1, 9), 3), "length")


@pytest.mark.parametrize("keep_blocks", [None, 1, 0])
def test_a_preempted_request_fetches_its_prefix_again_and_recomputes_what_the_pool_lost(keep_blocks):
    async def scenario():
        h = Harness(dies=2, blocks=6)
        await h.loop.start()
        requests = [_request(f"r{i}", _prompt(i, 9), 14, cached=8) for i in range(6)]
        for r in requests:
            r.prefix = pooled_prefix(r.token_ids[:8], BS, keep_blocks)
            h.submit(r)
        results = await asyncio.gather(*(h.collect(r) for r in requests))
        await h.loop.stop()
        return requests, results, h.free()

    requests, results, free = run(scenario())
    assert [tokens for tokens, _ in results] == [reference(_prompt(i, 9), 14) for i in range(6)]
    preempted = [r for r in requests if r.preemptions]
    assert preempted and all(len(r.prefix.fetches) == r.preemptions + 1 for r in preempted)
    assert free == [6, 6]


def test_the_dies_are_told_which_sequences_ended_at_the_next_step():
    async def scenario():
        h = Harness()
        await h.loop.start()
        first = [_request(f"a{i}", _prompt(i, 5), 2) for i in range(3)]
        for r in first:
            h.submit(r)
        await asyncio.gather(*(h.collect(r) for r in first))
        released_before = list(h.driver.released)
        h.submit(later := _request("b", _prompt(7, 5), 2))
        await h.collect(later)
        await h.loop.stop()
        return released_before, h.driver.released, first

    before, released, first = run(scenario())
    assert before == []  # no step ran since they ended
    assert sorted(rid for _, rid in released) == ["a0", "a1", "a2"]
    assert all(die == r.die for (die, rid), r in zip(sorted(released, key=lambda x: x[1]), first))


def test_the_driver_sends_a_sequence_in_full_once_per_admission_then_only_what_is_new():
    async def scenario():
        driver = InstanceDriver(["127.0.0.1:1"])  # no call is made: only the messages are built
        request = _request("r", _prompt(0, 6), 3)
        request.die, request.blocks, request.admissions = 0, [4, 5], 1
        first = driver._sequence_input(ScheduledChunk(request, request.token_ids, 0, True))
        request.blocks.append(9)
        second = driver._sequence_input(ScheduledChunk(request, [7], 6, True))
        request.admissions, request.blocks = 2, [1, 2]  # preempted and readmitted
        again = driver._sequence_input(ScheduledChunk(request, request.token_ids, 0, True))
        await driver.close()
        return first, second, again

    first, second, again = run(scenario())
    assert (first.cached, list(first.block_table), first.sampling.max_tokens) == (False, [4, 5], 3)
    assert (second.cached, list(second.block_table), second.HasField("sampling")) == (True, [9], False)
    assert (again.cached, list(again.block_table)) == (False, [1, 2])
