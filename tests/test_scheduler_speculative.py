"""The scheduler with MTP drafts (speculative_tokens 1) against fake dies whose drafts are right two
times in three (tests/fake_dies.py): the tokens are exactly the draft-free reference's, through
preemption; a draft takes a KV slot and a token of the step budget; an accepted draft gives two
tokens in one step but never a token beyond max_tokens, a stop token or the context."""
from __future__ import annotations

import asyncio

from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.request import Request
from cloudmatrix.instance.scheduler import Scheduler, SchedulerLimits
from cloudmatrix.instance.step import SequenceOutput, StepTiming
from cloudmatrix.sampling_params import FinishReason, SamplingParams, StopRule
from tests.fake_dies import next_token, pooled_prefix, reference
from tests.test_scheduler import BS, Harness, _prompt, run

SPECULATIVE = SchedulerLimits(max_running=8, max_waiting=8, max_step_tokens=16, speculative_tokens=1)


def _decode_request(rid: str, prompt: list[int], new: int, stop: StopRule | None = None) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=new), stop or StopRule(new),
                   prefix=pooled_prefix(prompt[:4], BS), chunk_tokens=6)


def test_drafted_tokens_are_the_reference_tokens_through_preemption_with_fewer_steps():
    async def scenario():
        h = Harness(dies=2, blocks=6, limits=SPECULATIVE)  # 6 blocks of 4 per die: preemption
        await h.loop.start()
        requests = [_decode_request(f"r{i}", _prompt(i, 5), 13 + i % 2) for i in range(6)]
        for r in requests:
            h.submit(r)
        results = await asyncio.gather(*(h.collect(r) for r in requests))
        counts, free, preemptions = h.loop.scheduler.speculation, h.free(), h.loop.scheduler.preemptions
        forwards = h.driver.forwards
        await h.loop.stop()
        return results, counts, free, preemptions, forwards

    results, counts, free, preemptions, forwards = run(scenario())
    assert [tokens for tokens, _ in results] == [reference(_prompt(i, 5), 13 + i % 2) for i in range(6)]
    assert {reason for _, reason in results} == {"length"}
    assert preemptions > 0 and free == [6, 6]
    assert 0 < counts.accepted < counts.drafts  # drafts accepted and rejected
    assert forwards < sum(len(tokens) for tokens, _ in results)


def _one_running(limits: SchedulerLimits, prompt: list[int], stop: StopRule, draft: int | None):
    """A scheduler holding one running request whose prompt is computed and whose next step
    samples after its last token (with ``draft`` to verify)."""
    events = []
    scheduler = Scheduler(BlockManager([list(range(8))], BS), limits, lambda r, e: events.append(e))
    request = Request("r", list(prompt), SamplingParams(max_tokens=stop.max_new_tokens), stop)
    scheduler.add(request)
    plan = scheduler.schedule()
    scheduler.complete(plan, {"r": SequenceOutput((next_token(prompt),), draft=draft)}, StepTiming(0.0, 0.0, 0.0))
    return scheduler, request, events


def test_a_draft_takes_a_kv_slot_and_a_token_of_the_budget():
    prompt = _prompt(1, 6)
    scheduler, request, _ = _one_running(SPECULATIVE, prompt, StopRule(8), draft=42)
    plan = scheduler.schedule()
    [chunk] = plan.chunks
    assert chunk.token_ids == [request.token_ids[-1]] and chunk.draft == 42 and chunk.start == 6
    assert len(request.blocks) == scheduler.blocks.blocks_for(8)  # positions 6 and 7: the draft's slot too
    assert chunk.slots == 2


def test_no_draft_where_its_tokens_would_pass_max_tokens_or_the_context():
    prompt = _prompt(2, 6)
    # one completion token left (max_tokens 2, the first sampled): no draft
    scheduler, request, _ = _one_running(SPECULATIVE, prompt, StopRule(2), draft=42)
    assert scheduler.schedule().chunks[0].draft is None
    # two tokens to the context limit: a draft; one: none
    scheduler, request, _ = _one_running(SPECULATIVE, prompt, StopRule(8, context_limit=9), draft=42)
    assert scheduler.schedule().chunks[0].draft == 42
    scheduler, request, _ = _one_running(SPECULATIVE, prompt, StopRule(8, context_limit=8), draft=42)
    assert scheduler.schedule().chunks[0].draft is None
    # an instance that does not speculate never sends one
    scheduler, request, _ = _one_running(SchedulerLimits(), prompt, StopRule(8), draft=42)
    assert scheduler.schedule().chunks[0].draft is None


def test_an_accepted_draft_that_stops_the_request_drops_the_token_after_it():
    prompt = _prompt(3, 6)
    first = next_token(prompt)
    stop_token = next_token(prompt + [first])
    stop = StopRule(8, stop_token_ids=frozenset({stop_token}))
    scheduler, request, events = _one_running(SPECULATIVE, prompt, stop, draft=stop_token)
    plan = scheduler.schedule()
    scheduler.complete(plan, {"r": SequenceOutput((stop_token, 7), draft=9)}, StepTiming(0.0, 0.0, 0.0))
    assert events[-1].token_ids == (stop_token,) and events[-1].finish_reason is FinishReason.STOP
    assert events[-1].drafted and request.token_ids == prompt + [first, stop_token]
    assert scheduler.blocks.num_free(0) == 8
