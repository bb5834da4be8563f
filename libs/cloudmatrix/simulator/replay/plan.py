"""`cmx plan`: the cheapest deployments in NPUs that serve a request stream within an SLO, found
by replaying it (the virtual-time engine) on candidate deployments.

Prefill and decode are sized apart, as Dynamo's planner does: first the smallest decode instance
(dies, from ``DECODE_DIES``) whose requests meet the TPOT SLO, with prefill to spare; then, for
each prefill instance size (``PREFILL_DIES``), the fewest instances whose requests meet the TTFT
SLO (replayed up to the first token only: what TTFT depends on). Each of the two searches aims at
half the misses ``attainment`` allows, so that both SLOs together hold (a union bound). Each search is a binary search
(more NPUs never make a replay worse). The candidates are then replayed whole, cheapest first; a
deployment meets the SLO when at least ``attainment`` of its requests meet both, and the pick is
the cheapest that meets it in two replays with different MTP draws (one more prefill instance is
tried when the pair misses)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from cloudmatrix.simulator.replay.engine import Deployment, Replay
from cloudmatrix.simulator.replay.report import Slo, summary, tpot_s
from cloudmatrix.simulator.replay.workload import TraceRequest

DECODE_DIES = (16, 32, 64, 96, 128, 160, 192, 256, 320)
PREFILL_DIES = (16, 32, 64, 128)    # dies per prefill instance: SP spreads a long prompt over more


@dataclasses.dataclass(frozen=True)
class Outcome:
    deployment: Deployment
    ttft_share: float                # requests within the TTFT SLO
    tpot_share: float                # requests within the TPOT SLO
    share: float                     # within both
    summary: dict
    prefill_only: bool = False       # replayed up to the first token: only ttft_share says anything

    @property
    def npus(self) -> float:
        return self.deployment.npus

    def meets(self, attainment: float) -> bool:
        return self.share >= attainment


def evaluate(requests: list[TraceRequest], deployment: Deployment, slo: Slo, seed: int = 0,
             prefill_only: bool = False) -> Outcome:
    replay = Replay(requests, deployment, seed=seed, prefill_only=prefill_only).run()
    done = [t for t in replay.tracks.values() if t.done is not None]
    n = len(replay.tracks) or 1
    ttft = [t.first_token - t.arrival <= slo.ttft_s for t in done]
    tpot = [(tpot_s(t) or 0.0) <= slo.tpot_s for t in done]
    return Outcome(deployment, sum(ttft) / n, sum(tpot) / n, sum(a and b for a, b in zip(ttft, tpot)) / n,
                   summary(replay, slo), prefill_only)


def _smallest(options: Sequence, ok: Callable[[object], bool]):
    """The first option for which ``ok`` holds (``ok`` is monotone over ``options``), or None."""
    low, high, best = 0, len(options) - 1, None
    while low <= high:
        mid = (low + high) // 2
        if ok(options[mid]):
            best, high = options[mid], mid - 1
        else:
            low = mid + 1
    return best


@dataclasses.dataclass(frozen=True)
class Plan:
    ranked: list[Outcome]            # every whole replay, cheapest meeting the SLO first
    pick: Outcome | None             # the cheapest that met it in two replays
    confirmed: Outcome | None        # the pick's second replay (other MTP draws)


def plan(requests: list[TraceRequest], slo: Slo, base: Deployment = Deployment(), attainment: float = 0.95,
         max_prefill_instances: int = 16, seed: int = 0,
         on_outcome: Callable[[Outcome], None] | None = None) -> Plan:
    if not 0.0 < attainment <= 1.0:
        raise ValueError(f"attainment must be in (0, 1], got {attainment}")
    whole: dict[Deployment, Outcome] = {}

    def run(d: Deployment, prefill_only: bool = False) -> Outcome:
        outcome = evaluate(requests, d, slo, seed, prefill_only)
        if not prefill_only:
            whole[d] = outcome
        if on_outcome is not None:
            on_outcome(outcome)
        return outcome

    spare = dataclasses.replace(base, prefill_instances=max_prefill_instances, prefill_dies=max(PREFILL_DIES),
                                decode_instances=1)
    part = 1.0 - (1.0 - attainment) / 2  # each SLO gets half the misses allowed: then both together hold
    dies = _smallest(DECODE_DIES, lambda n: run(dataclasses.replace(spare, decode_dies=n)).tpot_share >= part)
    decode = dataclasses.replace(spare, decode_dies=dies or DECODE_DIES[-1])
    counts = list(range(1, max_prefill_instances + 1))
    candidates = []
    for size in PREFILL_DIES:
        sized = dataclasses.replace(decode, prefill_dies=size)
        k = _smallest(counts, lambda k: run(dataclasses.replace(sized, prefill_instances=k), True).ttft_share
                      >= part)
        if k is not None:
            candidates.append(dataclasses.replace(sized, prefill_instances=k))
    pick = confirmed = None
    for candidate in sorted(candidates, key=lambda d: d.npus):
        for extra in range(3):
            d = dataclasses.replace(candidate, prefill_instances=candidate.prefill_instances + extra)
            first = whole.get(d) or run(d)
            if not first.meets(attainment):
                continue
            second = evaluate(requests, d, slo, seed + 1)
            if second.meets(attainment):
                pick, confirmed = first, second
                break
        if pick is not None:
            break
    ranked = sorted(whole.values(), key=lambda o: (not o.meets(attainment), o.npus))
    return Plan(ranked, pick, confirmed)
