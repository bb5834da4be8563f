"""One prefill or decode instance in virtual time: the serving system's own ``Scheduler`` (the
class the prefill and decode services run, imported, not copied) over a ``BlockManager`` sized
like the modeled dies' HBM, stepped by the engine with the cost model's time for each plan
(replay/costs.py) instead of the dies' Forward."""
from __future__ import annotations

import random

import torch

from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.request import Request, StepEvent
from cloudmatrix.instance.scheduler import Scheduler, SchedulerLimits
from cloudmatrix.instance.step import SequenceOutput, StepPlan, StepTiming
from cloudmatrix.simulator.replay.costs import StepCosts

TOKEN = 7  # every simulated token (the stop rule ignores EOS; lengths come from the trace)


class SimInstance:
    def __init__(self, name: str, costs: StepCosts, blocks_per_die: int, block_tokens: int,
                 limits: SchedulerLimits, seed: int = 0) -> None:
        self.name, self.costs = name, costs
        blocks = BlockManager([list(range(blocks_per_die)) for _ in range(costs.dies)], block_tokens)
        self.scheduler = Scheduler(blocks, limits, self._deliver)
        self.delivered: list[tuple[Request, StepEvent | Exception]] = []
        self.plan: StepPlan | None = None      # the step running now
        self.started = 0.0
        self.busy_s = 0.0
        self.steps = 0
        self.intervals: list[tuple[float, float]] = []   # (start, end) of every step, simulated seconds
        self.stepped: list[tuple[str, ...]] | None = None  # when a list: the request ids of every step
        self.gather: tuple[int, int] | None = None  # gathering a burst: (requests waiting, waits so far)
        self.gathered = False                       # the burst is in: the next start steps at once
        self.rng = random.Random(seed)

    def _deliver(self, request: Request, item: StepEvent | Exception) -> None:
        self.delivered.append((request, item))

    @property
    def load(self) -> int:
        """Running + waiting requests: what the gateway's picker reads from GetLoad."""
        return len(self.scheduler.requests)

    def start_step(self, now: float) -> tuple[StepPlan, float] | None:
        """The next plan and its seconds, or None when nothing can step (the plan's fetches, if
        any, are the engine's to start)."""
        self.scheduler.apply_aborts()
        self.scheduler.apply_arrivals()
        plan = self.scheduler.schedule()
        if plan.empty:
            self.plan = None
            return (plan, 0.0) if plan.fetches else None
        self.plan, self.started = plan, now
        if self.stepped is not None:
            self.stepped.append(tuple(c.request.request_id for c in plan.chunks))
        return plan, self.costs.step_s(plan.chunks)

    def finish_step(self, now: float) -> list[tuple[Request, StepEvent | Exception]]:
        """Complete the running step: each sampled chunk gets one token, two when its MTP draft
        is accepted (with the costs' acceptance); returns what was delivered."""
        plan, self.plan = self.plan, None
        outputs = {}
        for chunk in plan.chunks:
            if chunk.sample:
                accepted = chunk.draft is not None and self.rng.random() < self.costs.acceptance
                outputs[chunk.request.request_id] = SequenceOutput((TOKEN, TOKEN) if accepted else (TOKEN,),
                                                                   draft=TOKEN if self.scheduler.limits.speculative_tokens
                                                                   else None)
        elapsed = now - self.started
        self.busy_s += elapsed
        self.intervals.append((self.started, now))
        self.steps += 1
        finished = self.scheduler.complete(plan, outputs, StepTiming(self.started, elapsed, elapsed))
        for request, event in finished:  # none export KV here: the handoff is the engine's
            self.scheduler.finish_exported(request, event, [])
        delivered, self.delivered = self.delivered, []
        return delivered


def prefix_kv(tokens: int, block_tokens: int) -> list[torch.Tensor]:
    """Stand-ins for a fetched prefix's KV: the scheduler reads only each block's token count."""
    full, tail = divmod(tokens, block_tokens)
    return [_empty(block_tokens)] * full + ([_empty(tail)] if tail else [])


_EMPTY: dict[int, torch.Tensor] = {}


def _empty(tokens: int) -> torch.Tensor:
    if tokens not in _EMPTY:
        _EMPTY[tokens] = torch.empty((0, tokens, 0))
    return _EMPTY[tokens]
