"""A stateful property test of the instance scheduler (hypothesis): random adds (some with a
prefix in the pool), aborts, steps (with prefix fetches that lose blocks or fail) and die
failures. Whatever happens, no KV block is lost or owned twice, every request ends exactly once
(one finish reason, or one error), and every request that ran to its length got exactly the
tokens a scheduler-free reference gives."""
from __future__ import annotations

import collections
import dataclasses

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cloudmatrix.errors import FieldError
from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.loop import InstanceUnavailable
from cloudmatrix.instance.request import KvPrefix, Request, StepEvent
from cloudmatrix.instance.scheduler import Scheduler, SchedulerLimits
from cloudmatrix.instance.step import SequenceOutput, StepTiming
from cloudmatrix.rpc.errors import PeerUnavailable, ResourceExhausted
from cloudmatrix.sampling_params import FinishReason, SamplingParams, StopRule
from tests.fake_dies import fake_step, prefix_kv, reference

BS, DIES, BLOCKS = 4, 2, 6
LIMITS = SchedulerLimits(max_running=4, max_waiting=6, max_step_tokens=12)


class Dies:
    """Dies whose KV is the token ids (tests/fake_dies.py's rule, stepped synchronously)."""

    def __init__(self) -> None:
        self.slots = [dict() for _ in range(DIES)]

    def write(self, request: Request, kv: list[torch.Tensor]) -> None:
        for block, tokens in zip(request.blocks, kv):
            for i, value in enumerate(tokens[0, :, 0].tolist()):
                self.slots[request.die][block * BS + i] = int(value)

    def forward(self, chunks) -> dict[str, SequenceOutput]:
        return {c.request.request_id: fake_step(self.slots[c.request.die], c, BS) for c in chunks}


def _no_fetch():
    raise AssertionError("the test delivers fetched prefixes itself")


class SchedulerMachine(RuleBasedStateMachine):
    limits = LIMITS

    def __init__(self) -> None:
        super().__init__()
        self.scheduler = Scheduler(self._fresh_blocks(), self.limits, self._deliver)
        self.dies = Dies()
        self.added: dict[str, tuple[list[int], int]] = {}   # id -> (prompt, max tokens)
        self.tokens: dict[str, list[int]] = collections.defaultdict(list)
        self.ends: dict[str, list] = collections.defaultdict(list)
        self.aborted: set[str] = set()
        self.fetching: list[tuple[Request, int]] = []
        self.count = 0

    @staticmethod
    def _fresh_blocks() -> BlockManager:
        return BlockManager([list(range(d * 100, d * 100 + BLOCKS)) for d in range(DIES)], BS)

    def _deliver(self, request: Request, item: StepEvent | Exception) -> None:
        rid = request.request_id
        assert not self.ends[rid], f"{rid}: an event after its end"
        if isinstance(item, Exception):
            self.ends[rid].append(item)
            return
        self.tokens[rid] += item.token_ids
        if item.finish_reason is not None:
            self.ends[rid].append(item.finish_reason)

    @rule(prompt_len=st.integers(1, 14), new=st.integers(1, 8), pooled_blocks=st.integers(0, 3))
    def add(self, prompt_len: int, new: int, pooled_blocks: int) -> None:
        rid, self.count = f"r{self.count}", self.count + 1
        prompt = [(self.count * 7919 + i * 104729) % 90 + 3 for i in range(prompt_len)]
        pooled = min(pooled_blocks * BS, (prompt_len - 1) // BS * BS)
        prefix = KvPrefix(pooled, _no_fetch) if pooled else None
        request = Request(rid, list(prompt), SamplingParams(max_tokens=new), StopRule(new), prefix=prefix,
                          chunk_tokens=5)
        try:
            self.scheduler.add(request)
        except (FieldError, ResourceExhausted):
            return
        self.added[rid] = (prompt, new)

    @precondition(lambda self: self.scheduler.requests)
    @rule(data=st.data())
    def abort(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        self.scheduler.abort(rid, FinishReason.CANCELLED)
        self.aborted.add(rid)

    @rule(lost_blocks=st.integers(0, 3), fetch_fails=st.booleans())
    def step(self, lost_blocks: int = 0, fetch_fails: bool = False) -> None:
        s = self.scheduler
        s.apply_aborts()
        for request, admission in self.fetching:  # the fetches started by the last plan come back
            blocks = prefix_kv(request.token_ids[:request.prefix_tokens], BS)
            outcome = PeerUnavailable("kvcache down") if fetch_fails else blocks[:max(0, len(blocks) - lost_blocks)]
            s.prefix_arrived(request, admission, outcome)
        self.fetching = []
        for request, kv in s.apply_arrivals():
            self.dies.write(request, kv)
        plan = s.schedule()
        self.fetching = [(r, r.admissions) for r in plan.fetches]
        if plan.empty:
            return
        # the dies are never told to forget a sequence that this very step sends them
        assert not {(c.request.die, c.request.request_id) for c in plan.chunks} & set(plan.released)
        for request, event in s.complete(plan, self.dies.forward(plan.chunks), StepTiming(0.0, 0.0, 0.0)):
            s.finish_exported(request, event, [])

    @rule()
    def dies_fail(self) -> None:
        self.scheduler.fail_all(InstanceUnavailable("a die went away"))
        self.scheduler.reset(self._fresh_blocks())
        self.dies, self.fetching = Dies(), []

    @invariant()
    def every_block_is_free_or_held_by_one_request(self) -> None:
        s = self.scheduler
        for die in range(DIES):
            held = [b for r in s.running if r.die == die for b in r.blocks]
            assert len(held) == len(set(held)), f"die {die}: a block held twice"
            assert len(held) + s.blocks.num_free(die) == BLOCKS, f"die {die}: blocks lost"
        assert all(not r.blocks for r in s.waiting)
        assert len(s.requests) == len(s.waiting) + len(s.running)

    def teardown(self) -> None:
        for _ in range(400):  # serve what is left, with the pool and dies healthy
            if not self.scheduler.requests:
                break
            self.step()
        assert not self.scheduler.requests, "requests never finished"
        for rid, (prompt, new) in self.added.items():
            assert len(self.ends[rid]) == 1, f"{rid} ended {len(self.ends[rid])} times"
            end, want = self.ends[rid][0], reference(prompt, new)
            if end == FinishReason.LENGTH:
                assert self.tokens[rid] == want
            elif end == FinishReason.CANCELLED:
                assert rid in self.aborted and self.tokens[rid] == want[:len(self.tokens[rid])]
            else:
                assert isinstance(end, (PeerUnavailable, InstanceUnavailable)), end


class SpeculativeMachine(SchedulerMachine):
    """The same with MTP drafts: a draft takes a KV slot and a token of the budget, an accepted one
    gives two tokens in a step (never beyond max_tokens), a rejected one's slot is rewritten."""

    limits = dataclasses.replace(LIMITS, speculative_tokens=1)


SchedulerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
SpeculativeMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_scheduler_state_machine = SchedulerMachine.TestCase
test_speculative_scheduler_state_machine = SpeculativeMachine.TestCase
