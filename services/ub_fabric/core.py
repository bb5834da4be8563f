"""The UB fabric's routing state, free of gRPC: groups of attached dies, their outbound queues,
per-link counters, and which all-to-all rounds completed.

Items in the queues are opaque to the core (the servicer puts frames there).
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Callable, Hashable

# (src, dst, bytes) -> modeled seconds on the real UB fabric
TransferModel = Callable[[int, int, int], float]


@dataclasses.dataclass
class LinkCounter:
    bytes: int = 0
    frames: int = 0
    bytes_by_kind: Counter = dataclasses.field(default_factory=Counter)
    modeled_transfer_s: float = 0.0
    measured_s: float = 0.0


@dataclasses.dataclass
class Member:
    die_id: int
    queue: asyncio.Queue
    greeted: bool = False


@dataclasses.dataclass
class Group:
    name: str
    world_size: int
    members: dict[int, Member] = dataclasses.field(default_factory=dict)
    frames_per_round: Counter = dataclasses.field(default_factory=Counter)

    @property
    def complete(self) -> bool:
        return len(self.members) == self.world_size


class FabricCore:
    def __init__(self, transfer_model: TransferModel) -> None:
        self.transfer_model = transfer_model
        self.groups: dict[str, Group] = {}
        self.links: dict[tuple[str, int, int], LinkCounter] = {}
        self.rounds_completed = 0

    def attach(self, group: str, die_id: int, world_size: int) -> tuple[asyncio.Queue, list[Member]]:
        """Register a die; returns its outbound queue and the members to greet now (all of them,
        once the group is complete). Bad or conflicting hellos raise ValueError."""
        if world_size < 1 or not 0 <= die_id < world_size:
            raise ValueError(f"hello: die_id {die_id} must be in [0, world_size={world_size})")
        g = self.groups.setdefault(group, Group(group, world_size))
        if g.world_size != world_size:
            raise ValueError(f"hello: group {group!r} has world_size {g.world_size}, not {world_size}")
        old = g.members.get(die_id)
        if old is not None:  # the die re-attached (restarted or reloaded): its old stream ends
            old.queue.put_nowait(None)
        member = g.members[die_id] = Member(die_id, asyncio.Queue())
        to_greet = [m for m in g.members.values() if not m.greeted] if g.complete else []
        for m in to_greet:
            m.greeted = True
        return member.queue, to_greet

    def detach(self, group: str, die_id: int, queue: asyncio.Queue) -> list[Member]:
        """Forget the die attached with ``queue`` (not a newer attachment of the same die);
        returns the remaining members, who must be told."""
        g = self.groups.get(group)
        if g is None or die_id not in g.members or g.members[die_id].queue is not queue:
            return []
        del g.members[die_id]
        g.frames_per_round.clear()  # rounds in flight can no longer complete
        for m in g.members.values():
            m.greeted = False  # when the group is whole again, everyone is greeted again
        if not g.members:
            del self.groups[group]
        return list(g.members.values())

    def route(self, group: str, src: int, dst: int, round_key: Hashable, nbytes: int,
              kind: str = "") -> tuple[Member | None, float]:
        """Count a frame on its link (and under its round kind) and find its destination (None: not
        attached, drop it). Returns the destination and the modeled UB transfer seconds."""
        g = self.groups[group]
        if not 0 <= dst < g.world_size or dst == src:
            raise ValueError(f"frame: dst_die {dst} must be another die in [0, {g.world_size})")
        modeled = self.transfer_model(src, dst, nbytes)
        link = self.links.setdefault((group, src, dst), LinkCounter())
        link.bytes += nbytes
        link.bytes_by_kind[kind] += nbytes
        link.frames += 1
        link.modeled_transfer_s += modeled
        g.frames_per_round[round_key] += 1
        if g.frames_per_round[round_key] == g.world_size * (g.world_size - 1):
            del g.frames_per_round[round_key]
            self.rounds_completed += 1
        return g.members.get(dst), modeled

    def record_delivery(self, group: str, src: int, dst: int, seconds: float) -> None:
        link = self.links.get((group, src, dst))
        if link is not None:
            link.measured_s += seconds

    def stats(self, reset: bool = False) -> tuple[dict[tuple[str, int, int], LinkCounter], int, int]:
        links = {k: dataclasses.replace(v, bytes_by_kind=Counter(v.bytes_by_kind)) for k, v in self.links.items()}
        rounds = self.rounds_completed
        attached = sum(len(g.members) for g in self.groups.values())
        if reset:
            self.links.clear()
            self.rounds_completed = 0
        return links, rounds, attached
