"""The UB fabric's routing state, free of gRPC: groups of attached dies, their outbound queues,
the all-to-all rounds being gathered, per-link counters, and which rounds completed.

A die deposits one bundle per round: a parcel for every peer. Once every die of the group has
deposited, the round is delivered: each die gets the parcels addressed to it, keyed by source.
Parcels and queue items are opaque to the core (the servicer puts frames there).
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Callable, Hashable

from cloudmatrix.errors import FieldError

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
    # round -> destination die -> source die -> parcel, for rounds not every die has deposited to
    gathering: dict[Hashable, dict[int, dict[int, object]]] = dataclasses.field(default_factory=dict)
    senders: dict[Hashable, set[int]] = dataclasses.field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.members) == self.world_size

    def forget_rounds(self) -> None:
        """Rounds being gathered can no longer complete (a die left or was replaced)."""
        self.gathering.clear()
        self.senders.clear()


class FabricCore:
    def __init__(self, transfer_model: TransferModel) -> None:
        self.transfer_model = transfer_model
        self.groups: dict[str, Group] = {}
        self.links: dict[tuple[str, int, int], LinkCounter] = {}   # since start or the last Stats reset
        self.totals: dict[tuple[int, int], LinkCounter] = {}       # (src, dst) over all groups, never reset
        self.rounds_completed = 0

    def attach(self, group: str, die_id: int, world_size: int) -> tuple[asyncio.Queue, list[Member]]:
        """Register a die; returns its outbound queue and the members to greet now (all of them,
        once the group is complete). Bad or conflicting hellos raise ValueError."""
        if world_size < 1 or not 0 <= die_id < world_size:
            raise FieldError("hello", f"die_id {die_id} must be in [0, world_size={world_size})")
        g = self.groups.setdefault(group, Group(group, world_size))
        if g.world_size != world_size:
            raise FieldError("hello", f"group {group!r} has world_size {g.world_size}, not {world_size}")
        old = g.members.get(die_id)
        if old is not None:  # the die re-attached (restarted or reloaded): its old stream ends
            old.queue.put_nowait(None)
            g.forget_rounds()
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
        g.forget_rounds()
        for m in g.members.values():
            m.greeted = False  # when the group is whole again, everyone is greeted again
        if not g.members:
            del self.groups[group]
        return list(g.members.values())

    def deposit(self, group: str, src: int, round_key: Hashable, parcels: dict[int, tuple[object, int]],
                kind: str = "") -> list[tuple[Member, dict[int, object]]]:
        """Take die ``src``'s bundle for a round: parcels {dst: (parcel, payload bytes)}, one for
        every other die of the group. Counts every parcel on its link (bytes, under the round kind
        too, and modeled UB transfer seconds). Returns the deliveries the round's completion makes:
        every attached die with its parcels {src: parcel}; none while dies have not deposited yet.
        A bad bundle raises ValueError and changes nothing."""
        g = self.groups[group]
        peers = set(range(g.world_size)) - {src}
        if set(parcels) != peers:
            wrong = sorted(set(parcels) - peers) or sorted(peers - set(parcels))
            raise FieldError("bundle", f"die {src} must send one parcel to each of dies {sorted(peers)}; "
                             f"peer_die {wrong} is wrong or missing")
        senders = g.senders.setdefault(round_key, set())
        if src in senders:
            raise FieldError("bundle", f"die {src} sent twice in the same round")
        senders.add(src)
        gathering = g.gathering.setdefault(round_key, {})
        for dst, (parcel, nbytes) in parcels.items():
            self._count(group, src, dst, nbytes, kind)
            gathering.setdefault(dst, {})[src] = parcel
        if len(senders) < g.world_size:
            return []
        del g.gathering[round_key], g.senders[round_key]
        self.rounds_completed += 1
        return [(g.members[dst], by_src) for dst, by_src in gathering.items() if dst in g.members]

    def missing(self, group: str, round_key: Hashable) -> list[int] | None:
        """Dies of the group that have not deposited for a round being gathered (None: no bundle
        of that round is held)."""
        g = self.groups.get(group)
        if g is None or round_key not in g.senders:
            return None
        return sorted(set(range(g.world_size)) - g.senders[round_key])

    def _count(self, group: str, src: int, dst: int, nbytes: int, kind: str) -> None:
        modeled = self.transfer_model(src, dst, nbytes)
        for link in (self.links.setdefault((group, src, dst), LinkCounter()),
                     self.totals.setdefault((src, dst), LinkCounter())):
            link.bytes += nbytes
            link.bytes_by_kind[kind] += nbytes
            link.frames += 1
            link.modeled_transfer_s += modeled

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
