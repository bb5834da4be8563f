"""The fabric's routing state without gRPC: groups, greetings, re-attachment, counters, rounds."""
from __future__ import annotations

import pytest

from services.ub_fabric.core import FabricCore


def _core() -> FabricCore:
    return FabricCore(lambda src, dst, nbytes: 1e-6 + nbytes / 1e9)


def test_group_is_greeted_once_complete():
    core = _core()
    _, greet0 = core.attach("g", 0, 3)
    _, greet1 = core.attach("g", 1, 3)
    _, greet2 = core.attach("g", 2, 3)
    assert greet0 == [] and greet1 == [] and sorted(m.die_id for m in greet2) == [0, 1, 2]


@pytest.mark.parametrize("die,world,needle", [(3, 3, "die_id 3"), (0, 0, "world_size=0")])
def test_bad_hello_is_rejected(die, world, needle):
    with pytest.raises(ValueError, match=needle):
        _core().attach("g", die, world)


def test_world_size_must_agree_within_a_group():
    core = _core()
    core.attach("g", 0, 2)
    with pytest.raises(ValueError, match="world_size 2"):
        core.attach("g", 1, 4)


def test_a_round_is_delivered_once_every_die_deposited_and_counted_per_link():
    core = _core()
    for d in range(3):
        core.attach("g", d, 3)
    deliveries = []
    for src in range(3):
        assert deliveries == []  # nothing moves before the last die's bundle
        parcels = {dst: (f"{src}->{dst}", 1000) for dst in set(range(3)) - {src}}
        deliveries = core.deposit("g", src, ("r", 1), parcels, "ROUND_KIND_DISPATCH")
    got = {member.die_id: by_src for member, by_src in deliveries}
    assert got == {dst: {src: f"{src}->{dst}" for src in set(range(3)) - {dst}} for dst in range(3)}
    links, rounds, attached = core.stats(reset=True)
    assert rounds == 1 and attached == 3 and len(links) == 6
    assert all(c.bytes == 1000 and c.frames == 1 and c.bytes_by_kind["ROUND_KIND_DISPATCH"] == 1000
               and c.modeled_transfer_s == pytest.approx(2e-6) for c in links.values())
    assert core.stats()[0] == {}  # reset
    assert core.totals[(0, 1)].bytes == 1000  # Prometheus' running totals are never reset


def test_missing_names_the_dies_a_round_waits_for():
    core = _core()
    for d in range(3):
        core.attach("g", d, 3)
    assert core.missing("g", "r") is None
    core.deposit("g", 1, "r", {0: ("p", 1), 2: ("p", 1)})
    assert core.missing("g", "r") == [0, 2]


@pytest.mark.parametrize("parcels,needle", [
    ({1: ("p", 1)}, r"peer_die \[2\] is wrong or missing"),        # a peer left out
    ({0: ("p", 1), 1: ("p", 1), 2: ("p", 1)}, r"peer_die \[0\]"),  # to itself
    ({1: ("p", 1), 2: ("p", 1), 5: ("p", 1)}, r"peer_die \[5\]"),  # outside the group
])
def test_bad_bundles_are_rejected_without_changing_anything(parcels, needle):
    core = _core()
    for d in range(3):
        core.attach("g", d, 3)
    with pytest.raises(ValueError, match=needle):
        core.deposit("g", 0, "r", parcels)
    assert core.stats()[0] == {} and core.missing("g", "r") is None


def test_a_die_cannot_deposit_twice_in_a_round():
    core = _core()
    for d in range(2):
        core.attach("g", d, 2)
    core.deposit("g", 0, "r", {1: ("p", 1)})
    with pytest.raises(ValueError, match="sent twice"):
        core.deposit("g", 0, "r", {1: ("p", 1)})


def test_a_die_leaving_drops_the_rounds_being_gathered():
    core = _core()
    queues = [core.attach("g", d, 3)[0] for d in range(3)]
    core.deposit("g", 0, "r", {1: ("p", 1), 2: ("p", 1)})
    core.detach("g", 2, queues[2])
    assert core.missing("g", "r") is None


def test_detach_tells_the_rest_and_reattach_replaces_the_old_stream():
    core = _core()
    queues = [core.attach("g", d, 2)[0] for d in range(2)]
    new_queue, greet = core.attach("g", 1, 2)  # die 1 restarted before its old stream closed
    assert queues[1].get_nowait() is None  # the old stream is told to end
    assert [m.die_id for m in greet] == [1]  # only the new attachment needs the Hello
    assert core.detach("g", 1, queues[1]) == []  # the old stream's cleanup leaves the new one alone
    remaining = core.detach("g", 1, new_queue)
    assert [m.die_id for m in remaining] == [0]
    _, greet = core.attach("g", 1, 2)  # whole again: everyone is greeted again
    assert sorted(m.die_id for m in greet) == [0, 1]
