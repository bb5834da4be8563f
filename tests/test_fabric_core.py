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


def test_counters_and_completed_rounds():
    core = _core()
    for d in range(3):
        core.attach("g", d, 3)
    for src in range(3):
        for dst in set(range(3)) - {src}:
            member, modeled = core.route("g", src, dst, ("r", 1), 1000, "ROUND_KIND_DISPATCH")
            assert member.die_id == dst and modeled == pytest.approx(2e-6)
    links, rounds, attached = core.stats(reset=True)
    assert rounds == 1 and attached == 3 and len(links) == 6
    assert all(c.bytes == 1000 and c.frames == 1 and c.bytes_by_kind["ROUND_KIND_DISPATCH"] == 1000
               for c in links.values())
    assert core.stats()[0] == {}  # reset


def test_frames_to_self_or_outside_the_group_are_rejected():
    core = _core()
    core.attach("g", 0, 2)
    with pytest.raises(ValueError, match="dst_die 0"):
        core.route("g", 0, 0, "r", 10)
    with pytest.raises(ValueError, match="dst_die 5"):
        core.route("g", 0, 5, "r", 10)


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
