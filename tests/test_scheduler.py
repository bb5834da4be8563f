"""The instance scheduler and its step loop against a fake driver (milliseconds each): admission
by KV blocks, preemption and resume, aborts between steps, a failing step, the loop guard."""
from __future__ import annotations

import asyncio

import pytest

from cloudmatrix.errors import InternalError
from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.driver import die_phases
from cloudmatrix.instance.loop import SLOW_PROBES_DOWN, InstanceUnavailable, LoopSettings, LoopState, StepLoop
from cloudmatrix.instance.request import Request
from cloudmatrix.instance.scheduler import Scheduler, SchedulerLimits
from cloudmatrix.rpc.errors import ResourceExhausted
from cloudmatrix.rpc.timing import timing_proto
from cloudmatrix.sampling_params import FinishReason, SamplingParams, StopRule
from cmx.npu.v1 import npu_pb2
from tests.fake_dies import FakeDriver, die_failure, pooled_prefix, reference

BS = 4


def _request(rid: str, prompt: list[int], new: int, cached: int = 0, export: bool = False) -> Request:
    """A decode-style request: ``new`` tokens to sample; the first ``cached`` prompt tokens come
    with their KV (whole blocks)."""
    return Request(rid, list(prompt), SamplingParams(max_tokens=new), StopRule(new),
                   prefix=pooled_prefix(prompt[:cached], BS) if cached else None, chunk_tokens=6,
                   export_from_block=cached // BS if export else None)


def _ignore(request, item) -> None:
    """A Scheduler's deliver where no consumer reads the events."""


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 90 + 3 for i in range(n)]


class Harness:
    """A StepLoop over a FakeDriver, with health changes recorded."""

    def __init__(self, dies=2, blocks=8, limits=SchedulerLimits(max_running=8, max_waiting=8, max_step_tokens=16),
                 batch_wait_s=0.0, sleep=asyncio.sleep):
        self.driver = FakeDriver(dies, blocks, BS)
        self.health: list[bool] = []
        self.events = {}  # request id -> its events (StepLoop.submit)
        settings = LoopSettings("test-0", probe_interval_s=0.01, batch_wait_s=batch_wait_s)
        self.loop = StepLoop(self.driver, self.driver.load, limits, settings, on_health=self._on_health, sleep=sleep)

    async def _on_health(self, serving: bool) -> None:
        self.health.append(serving)

    def submit(self, request: Request) -> None:
        self.events[request.request_id] = self.loop.submit(request)

    async def collect(self, request: Request) -> tuple[list[int], str]:
        tokens, reason = [], None
        async for event in self.events.pop(request.request_id):
            tokens += event.token_ids
            reason = event.finish_reason
        return tokens, reason

    def free(self) -> list[int]:
        return [self.loop.scheduler.blocks.num_free(d) for d in range(2)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_admission_takes_whole_requests_by_blocks_on_the_roomiest_die():
    s = Scheduler(BlockManager([[0, 1, 2, 3], [10, 11, 12, 13]], BS), SchedulerLimits(max_step_tokens=64), _ignore)
    for i in range(3):
        s.add(_request(f"r{i}", _prompt(i, 10), 2))  # 10 tokens = 3 blocks
    plan = s.schedule()
    assert [(c.request.request_id, c.request.die, c.request.blocks) for c in plan.chunks] == [
        ("r0", 0, [0, 1, 2]), ("r1", 1, [10, 11, 12])]
    assert [r.request_id for r in s.waiting] == ["r2"]  # one block left per die: it waits
    assert [c.token_ids for c in plan.chunks] == [_prompt(0, 10)[:6], _prompt(1, 10)[:6]]  # chunk_tokens 6


def test_requests_that_can_never_fit_or_overflow_the_queue_are_refused():
    s = Scheduler(BlockManager([[0, 1]], BS), SchedulerLimits(max_waiting=1), _ignore)
    with pytest.raises(ValueError, match="token_ids"):
        s.add(_request("long", _prompt(0, 9), 1))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add(_request("grows", _prompt(0, 6), 4))
    s.add(_request("a", _prompt(0, 3), 2))
    with pytest.raises(ResourceExhausted, match="queue full"):
        s.add(_request("b", _prompt(1, 3), 2))
    with pytest.raises(ValueError, match="request_id"):
        s.add(_request("a", _prompt(2, 3), 2))


def test_start_waits_until_every_die_answers_then_loads_them():
    """An instance whose dies are not up yet (a pod's containers start in any order) waits for
    them instead of failing its first load, then serves."""
    async def scenario():
        h = Harness()
        h.driver.down = {1}
        starting = asyncio.ensure_future(h.loop.start())
        while h.driver.probes < 5:
            await asyncio.sleep(0.01)
        waited = (starting.done(), h.driver.loads)
        h.driver.down = set()
        await starting
        request = _request("r", _prompt(1, 5), 4)
        h.submit(request)
        tokens, _ = await h.collect(request)
        await h.loop.stop()
        return waited, h.driver.loads, tokens

    waited, loads, tokens = run(scenario())
    assert waited == (False, 0) and loads == 1
    assert tokens == reference(_prompt(1, 5), 4)


def test_preemption_recomputes_and_every_request_gets_its_reference_tokens():
    async def scenario():
        h = Harness(dies=2, blocks=6)  # 6 blocks of 4 per die; each request grows to 5 blocks
        await h.loop.start()
        requests = [_request(f"r{i}", _prompt(i, 5), 14, cached=4) for i in range(6)]
        for r in requests:
            h.submit(r)
        results = await asyncio.gather(*(h.collect(r) for r in requests))
        free, preemptions = h.free(), h.loop.scheduler.preemptions
        await h.loop.stop()
        return requests, results, free, preemptions

    requests, results, free, preemptions = run(scenario())
    assert [tokens for tokens, _ in results] == [reference(_prompt(i, 5), 14) for i in range(6)]
    assert {reason for _, reason in results} == {"length"}
    assert preemptions > 0 and any(r.preemptions for r in requests)
    assert free == [6, 6]


@pytest.mark.parametrize("batch_wait_s", [0.0, 0.5])
def test_an_idle_instance_waits_for_a_burst_to_arrive_when_asked_to(batch_wait_s):
    async def scenario():
        gaps: list[float] = []
        gap_ends: asyncio.Queue = asyncio.Queue()

        async def gap(seconds: float) -> None:  # the loop's wait for more arrivals, on the test's clock
            gaps.append(seconds)
            await gap_ends.get()

        h = Harness(batch_wait_s=batch_wait_s, sleep=gap)
        await h.loop.start()
        requests = [_request(f"r{i}", _prompt(i, 4), 3) for i in range(3)]
        tasks = []
        for i, r in enumerate(requests):  # a burst: each request arrives during the loop's wait
            h.submit(r)
            tasks.append(asyncio.create_task(h.collect(r)))
            if batch_wait_s:
                if i:
                    gap_ends.put_nowait(None)  # the gap the request arrived in ends
                while len(gaps) <= i:  # the loop waits for more
                    await asyncio.sleep(0)
            else:
                await h.driver.entered.wait()
        if batch_wait_s:
            gap_ends.put_nowait(None)  # a gap with no arrival: the burst is over
        results = await asyncio.gather(*tasks)
        await h.loop.stop()
        return h.driver.step_sizes, results, gaps

    step_sizes, results, gaps = run(scenario())
    assert [tokens for tokens, _ in results] == [reference(_prompt(i, 4), 3) for i in range(3)]
    if batch_wait_s:
        assert step_sizes[0] == 3 and gaps == [batch_wait_s] * 3  # the whole burst in the first step
    else:
        assert step_sizes[0] == 1  # the first request stepped as soon as it came


def test_a_request_leaving_mid_step_ends_between_steps_and_the_others_keep_their_tokens():
    async def scenario():
        h = Harness()
        await h.loop.start()
        requests = [_request(f"r{i}", _prompt(i, 7), 6) for i in range(4)]
        for r in requests:
            h.submit(r)
        tasks = [asyncio.ensure_future(h.collect(r)) for r in requests]
        while h.driver.forwards < 3:  # a few steps in, hold the next one open
            await asyncio.sleep(0)
        h.driver.gate, h.driver.entered = asyncio.Event(), asyncio.Event()
        await h.driver.entered.wait()
        assert h.loop.abort("r1", FinishReason.CANCELLED)  # lands while the step runs
        tasks[2].cancel()  # a consumer that leaves
        assert h.loop.abort("r2")
        h.driver.gate.set()
        results = await asyncio.gather(tasks[0], tasks[1], tasks[3])
        while h.loop.scheduler.requests:  # r2, whose consumer left, ends between steps too
            await asyncio.sleep(0)
        free = h.free()
        await h.loop.stop()
        return results, free

    (r0, r1, r3), free = run(scenario())
    assert r0 == (reference(_prompt(0, 7), 6), "length") and r3 == (reference(_prompt(3, 7), 6), "length")
    assert r1[1] == "cancelled" and r1[0] == reference(_prompt(1, 7), 6)[:len(r1[0])]
    assert free == [8, 8]


def test_exported_kv_holds_the_computed_blocks():
    async def scenario():
        h = Harness()
        await h.loop.start()
        prompt = _prompt(3, 11)
        request = _request("p", prompt, 1, cached=4, export=True)
        h.submit(request)
        events = [e async for e in h.events.pop(request.request_id)]
        await h.loop.stop()
        return prompt, events

    prompt, events = run(scenario())
    kv = events[-1].kv
    assert [int(v) for block in kv for v in block[0, :, 0].tolist()] == prompt[4:]  # blocks 1..2, tail of 3


def test_a_failing_step_fails_its_requests_turns_not_serving_and_recovers():
    async def scenario():
        h = Harness()
        await h.loop.start()
        h.driver.fail_next = die_failure()
        h.driver.down = {1}
        failed = _request("f", _prompt(0, 5), 3)
        h.submit(failed)
        with pytest.raises(InstanceUnavailable, match="die 1") as err:
            await h.collect(failed)
        assert not h.loop.serving
        with pytest.raises(InstanceUnavailable, match="recovering"):
            h.submit(_request("g", _prompt(1, 5), 3))
        h.driver.down = set()
        while not h.loop.serving:
            await asyncio.sleep(0.01)
        again = _request("g", _prompt(1, 5), 3)
        h.submit(again)
        result = await h.collect(again)
        await h.loop.stop()
        return str(err.value), h.health, h.driver.loads, result

    message, health, loads, result = run(scenario())
    assert "127.0.0.1" not in message and "StepFailed" not in message
    assert health == [False, True] and loads == 2
    assert result == (reference(_prompt(1, 5), 3), "length")


def test_a_die_found_down_while_idle_turns_the_instance_not_serving():
    async def scenario():
        h = Harness()
        await h.loop.start()
        h.driver.down = {0}
        while h.loop.serving:
            await asyncio.sleep(0.01)
        state = h.loop.state
        h.driver.down = set()
        while not h.loop.serving:
            await asyncio.sleep(0.01)
        await h.loop.stop()
        return state, h.health

    state, health = run(scenario())
    assert state is LoopState.RECOVERING and health == [False, True]


def test_a_die_slow_to_answer_probes_is_down_only_after_several_misses():
    async def scenario():
        h = Harness()
        await h.loop.start()
        h.driver.slow = {1}
        start = h.driver.probes
        while h.loop.serving:
            await asyncio.sleep(0.005)
        missed = h.driver.probes - start
        await h.loop.stop()
        return missed

    assert run(scenario()) >= SLOW_PROBES_DOWN


def test_a_bug_in_a_step_fails_its_requests_and_the_instance_keeps_serving(caplog):
    async def scenario():
        h = Harness()
        await h.loop.start()
        complete = h.loop.scheduler.complete

        def broken(*args):
            h.loop.scheduler.complete = complete  # once
            raise TypeError("bug in complete")

        h.loop.scheduler.complete = broken
        request = _request("x", _prompt(0, 5), 3)
        h.submit(request)
        with pytest.raises(InternalError, match="its step failed"):
            await h.collect(request)
        h.submit(y := _request("y", _prompt(1, 5), 3))
        after = await h.collect(y)
        state, free = h.loop.state, h.free()
        await h.loop.stop()
        return after, state, free, h

    (tokens, reason), state, free, h = run(scenario())
    assert len(tokens) == 3 and reason == "length"  # y is served
    assert state is LoopState.SERVING and h.health == [] and h.driver.loads == 1  # no reload
    assert free == [8, 8]  # x's blocks came back
    assert any(r.exc_info and isinstance(r.exc_info[1], TypeError) for r in caplog.records)


def test_a_crashing_loop_fails_every_request_and_stops_serving_for_good():
    async def scenario():
        h = Harness()
        await h.loop.start()

        def broken(*args):
            raise RuntimeError("bug in schedule")

        h.loop.scheduler.schedule = broken  # the loop itself, outside any step
        request = _request("x", _prompt(0, 5), 3)
        h.submit(request)
        with pytest.raises(InstanceUnavailable, match="scheduling loop crashed"):
            await h.collect(request)
        with pytest.raises(InstanceUnavailable):
            h.submit(_request("y", _prompt(1, 5), 3))
        state = h.loop.state
        await h.loop.stop()
        return state, h.health

    state, health = run(scenario())
    assert state is LoopState.BROKEN and health == [False]


def test_die_phases_are_means_over_the_dies_with_compute_the_rest():
    def reply(total, dispatch, combine, sample):
        return npu_pb2.ForwardReply(timing=timing_proto({"dispatch": dispatch, "combine": combine, "sample": sample},
                                                        {}, measured_s=total, modeled_s=0.0))

    phases = die_phases([reply(1.0, 0.2, 0.1, 0.05), reply(3.0, 0.4, 0.3, 0.15)])
    assert phases == pytest.approx({"forward": 2.0, "dispatch": 0.3, "combine": 0.2, "sample": 0.1,
                                                 "compute": 1.4})
