"""Expert-parallel load balancing (EPLB): redundant experts and their placement on dies.

Every die counts the tokens routed to each expert of each MoE layer; summed over dies that is the
instance's expert load. From it, `balance` builds an `ExpertPlacement` that gives the heaviest
experts extra replicas and packs all replicas so that every die gets about the same token load.
Metric: a layer's imbalance is max die load / mean die load (1.0 = perfect); `imbalance` averages
it over layers. Algorithm and measured ratios: docs/eplb.md.
Shape legend: L = layers, E = routed experts, D = dies.
"""
from __future__ import annotations

import heapq
import itertools
import math

import numpy as np
import torch

from cloudmatrix.moe.placement import ExpertPlacement

MAX_SWAP_PASSES = 4  # swap-improvement iterations per replica slot (they usually stop far earlier)

Replica = tuple[float, int]  # (token load of this copy, expert id)


def die_loads(placement: ExpertPlacement, counts: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    """counts: [L, E] tokens per expert -> [L, D] float64 tokens per die.

    Row i of counts belongs to layers[i] (default: placement.layers). An expert with n replicas
    gives count / n to each of its dies, so the total is conserved.
    """
    layers = placement.layers if layers is None else list(layers)
    if counts.dim() != 2 or counts.shape != (len(layers), placement.num_experts):
        raise ValueError(f"counts: shape {tuple(counts.shape)}, expected [{len(layers)} layers, "
                         f"{placement.num_experts} experts]")
    share = torch.zeros(len(layers), placement.num_experts, placement.num_dies, dtype=torch.float64)  # [L, E, D]
    for i, layer in enumerate(layers):
        if layer not in placement.replicas:
            raise ValueError(f"placement has no layer {layer} (it has {placement.layers})")
        for expert, dies in enumerate(placement.replicas[layer]):
            share[i, expert, list(dies)] = 1.0 / len(dies)
    return torch.einsum("le,led->ld", counts.to(torch.float64), share)  # [L, D]


def layer_imbalance(placement: ExpertPlacement, counts: torch.Tensor,
                    layers: list[int] | None = None) -> torch.Tensor:
    """Per-layer max/mean die load: [L] float64; a layer without tokens counts as 1.0."""
    loads = die_loads(placement, counts, layers)  # [L, D]
    mean = loads.mean(dim=1)  # [L]
    ratio = loads.max(dim=1).values / mean.clamp(min=1e-12)
    return torch.where(mean > 0, ratio, torch.ones_like(ratio))


def imbalance(placement: ExpertPlacement, counts: torch.Tensor, layers: list[int] | None = None) -> float:
    """Mean over layers of max/mean die load (1.0 = every die gets the same number of tokens)."""
    return float(layer_imbalance(placement, counts, layers).mean())


def balance(counts: torch.Tensor, num_dies: int, redundant: int, *, layers: list[int] | None = None,
            experts_per_die_cap: int | None = None) -> ExpertPlacement:
    """counts: [L, E] -> a placement with `redundant` extra replicas per layer, balanced per layer.

    Each die holds at most experts_per_die_cap replicas (default ceil((E + redundant) / D), which
    is an equal count per die when that divides). Row i of counts becomes layer layers[i]
    (default i). Deterministic: ties go to the lower expert / die id.
    """
    if counts.dim() != 2:
        raise ValueError(f"counts: expected [layers, experts], got shape {tuple(counts.shape)}")
    num_layers, num_experts = counts.shape
    layers = list(range(num_layers)) if layers is None else list(layers)
    cap = _slot_cap(num_experts, num_dies, redundant, experts_per_die_cap)
    if len(layers) != num_layers:
        raise ValueError(f"layers: {len(layers)} ids for {num_layers} rows of counts")
    replicas = {}
    for layer, row in zip(layers, counts.tolist()):
        copies = replica_counts(row, redundant, max_copies=num_dies)
        replicas[layer] = pack(row, copies, num_dies, cap)
    return ExpertPlacement(num_dies, num_experts, replicas)


def _slot_cap(num_experts: int, num_dies: int, redundant: int, cap: int | None) -> int:
    slots = num_experts + redundant
    if num_dies < 1 or redundant < 0:
        raise ValueError(f"need dies >= 1 and redundant >= 0 (got dies {num_dies}, redundant {redundant})")
    cap = math.ceil(slots / num_dies) if cap is None else cap
    if cap * num_dies < slots:
        raise ValueError(f"experts_per_die_cap {cap}: {num_dies} dies hold {cap * num_dies} replicas, "
                         f"need {slots}; raise the cap or lower redundant")
    return cap


def replica_counts(load: list[int], redundant: int, max_copies: int) -> list[int]:
    """Greedy: `redundant` times, add a copy to the expert with the highest load per copy
    (ties: fewer copies, then lower id), never more than max_copies (= dies) copies of one expert."""
    if redundant > len(load) * (max_copies - 1):
        raise ValueError(f"redundant {redundant}: at most {len(load) * (max_copies - 1)} extra replicas fit "
                         f"({len(load)} experts, each on at most {max_copies} dies)")
    copies = [1] * len(load)
    heap = [(-x, 1, e) for e, x in enumerate(load)]  # (-load per copy, copies, expert)
    heapq.heapify(heap)
    for _ in range(redundant):
        _, n, e = heapq.heappop(heap)
        copies[e] = n + 1
        if n + 1 < max_copies:
            heapq.heappush(heap, (-load[e] / (n + 1), n + 1, e))
    return copies


def pack(load: list[int], copies: list[int], num_dies: int, cap: int) -> tuple[tuple[int, ...], ...]:
    """Place copies[e] replicas of each expert e (each carrying load[e] / copies[e]) on dies.

    Longest processing time first: heaviest replica onto the least-loaded die that has a free
    slot and no copy of that expert yet, once filling dies round by round (one slot per die per
    round) and once up to `cap` directly; each result goes through `_improve` and the one with
    the lower heaviest die wins. Returns the dies of each expert, sorted.
    """
    replicas = sorted(((load[e] / n, e) for e, n in enumerate(copies) for _ in range(n)),
                      key=lambda r: (-r[0], r[1]))
    best = None
    for by_rounds in (True, False):
        bins: list[list[Replica]] = [[] for _ in range(num_dies)]
        for i, replica in enumerate(replicas):
            _place(bins, replica, min(cap, i // num_dies + 1) if by_rounds else cap)
        _improve(bins, cap, max_steps=MAX_SWAP_PASSES * len(replicas))
        peak = max(_total(items) for items in bins)
        if best is None or peak < best[0]:
            best = (peak, bins)
    bins = best[1]
    dies: list[list[int]] = [[] for _ in load]
    for die, items in enumerate(bins):
        for _, e in items:
            dies[e].append(die)
    return tuple(tuple(d) for d in dies)


def _total(items: list[Replica]) -> float:
    return sum(x for x, _ in items)


def _place(bins: list[list[Replica]], replica: Replica, cap: int) -> None:
    _, e = replica
    open_dies = [d for d, items in enumerate(bins) if len(items) < cap and all(f != e for _, f in items)]
    if not open_dies:
        open_dies = [_make_room(bins, e, cap)]
    die = min(open_dies, key=lambda d: (_total(bins[d]), d))
    bins[die].append(replica)


def _make_room(bins: list[list[Replica]], expert: int, cap: int) -> int:
    """Every die with a free slot already hosts `expert`: move some other expert from a full die
    without `expert` onto a free die, freeing a slot there. Such a pair always exists, since a
    full die holds more distinct experts than a die with a free slot."""
    for free in (d for d, items in enumerate(bins) if len(items) < cap):
        hosted = {f for _, f in bins[free]}
        for die, items in enumerate(bins):
            if expert in {f for _, f in items}:
                continue
            movable = [r for r in items if r[1] not in hosted]
            if movable:
                items.remove(movable[0])
                bins[free].append(movable[0])
                return die
    raise AssertionError(f"eplb: no die can take another replica of expert {expert} (cap {cap})")


EMPTY: Replica = (0.0, -1)  # a free slot, so that a move is a swap with an empty slot


def _improve(bins: list[list[Replica]], cap: int, max_steps: int) -> None:
    """Swap-improvement (pads every die to `cap` with EMPTY while it runs).

    Each step exchanges k replicas (k = 1, else 2) between the heaviest die and another die when
    that lowers the larger of the two loads, or else between the lightest die and another when
    that raises the smaller. Each step strictly lowers the sum of squared die loads and never
    raises the maximum, so this terminates; max_steps bounds the work.
    """
    for items in bins:
        items.extend([EMPTY] * (cap - len(items)))
    for _ in range(max_steps):
        totals = [_total(items) for items in bins]
        top = max(range(len(bins)), key=lambda d: (totals[d], -d))
        bottom = min(range(len(bins)), key=lambda d: (totals[d], d))
        tries = ((die, sign, k) for k in (1, 2) for die, sign in ((top, 1.0), (bottom, -1.0)))
        swap = next(filter(None, (_best_swap(bins, totals, *t) for t in tries)), None)
        if swap is None:
            break
        die, other, mine, theirs = swap  # slot indices on die and other
        for i, j in zip(mine, theirs):
            bins[die][i], bins[other][j] = bins[other][j], bins[die][i]
    for i, items in enumerate(bins):
        bins[i] = [r for r in items if r[1] >= 0]


def _best_swap(bins: list[list[Replica]], totals: list[float], die: int, sign: float, k: int):
    """Best exchange of the replicas in k slots `mine` of `die` with k slots `theirs` of another die.

    sign=+1 minimises the larger of the two new loads, sign=-1 maximises the smaller; only strict
    improvements over the die's current load count. Returns (die, other, mine, theirs) or None.
    """
    # M = slot groups on `die`, G = slot groups on the other dies
    mine = list(itertools.combinations(range(len(bins[die])), k))
    theirs = [(o, g) for o in range(len(bins)) if o != die for g in itertools.combinations(range(len(bins[o])), k)]
    x = np.array([sum(bins[die][i][0] for i in g) for g in mine])  # [M]
    y = np.array([sum(bins[o][j][0] for j in g) for o, g in theirs])[:, None]  # [G, 1]
    other_total = np.array([totals[o] for o, _ in theirs])[:, None]  # [G, 1]
    score = np.maximum(sign * (totals[die] - x + y), sign * (other_total + x - y))  # [G, M]
    limit = sign * totals[die] - 1e-9 * abs(totals[die])
    flat = score.ravel()
    for i in np.argsort(flat, kind="stable"):
        if flat[i] >= limit:
            return None
        (other, group), out = theirs[i // len(mine)], mine[i % len(mine)]
        if _can_swap(bins[die], out, bins[other], group):
            return die, other, out, group
    return None


def _can_swap(here: list[Replica], mine: tuple[int, ...], there: list[Replica], theirs: tuple[int, ...]) -> bool:
    """No die may end up with two copies of one expert (EMPTY slots have expert -1)."""
    stay_here = {e for i, (_, e) in enumerate(here) if i not in mine and e >= 0}
    stay_there = {e for j, (_, e) in enumerate(there) if j not in theirs and e >= 0}
    return not (stay_here & {there[j][1] for j in theirs} or stay_there & {here[i][1] for i in mine})


def zipf_counts(layers: int, experts: int, tokens: int, s: float = 1.2, seed: int = 0) -> torch.Tensor:
    """A skewed routing trace: [L, E] int64, `tokens` routed (token, expert) pairs per layer.

    Expert popularity follows Zipf(s) by rank; each layer ranks the experts by its own random
    permutation, so different layers have different hot experts.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, experts + 1, dtype=np.float64) ** s  # [E] by popularity rank
    probs = weights / weights.sum()
    rows = [rng.multinomial(tokens, probs[rng.permutation(experts)]) for _ in range(layers)]
    return torch.tensor(np.stack(rows), dtype=torch.int64)  # [L, E]
