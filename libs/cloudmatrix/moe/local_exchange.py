"""In-process exchanges: a single die (no fabric), and N dies as threads of one process (tests,
and measuring the MoE algorithm without gRPC)."""
from __future__ import annotations

import threading

from cloudmatrix.moe.dispatch import TokenRows


class SingleDieExchange:
    """EP1: every expert is local; a round just hands the rows back."""

    num_dies, die_id = 1, 0
    traffic: list = []

    def begin_step(self, step: int, microbatch: int) -> None:
        """Nothing to key: a single die has no peers."""

    def all_to_all(self, kind: str, layer: int, outgoing: dict[int, TokenRows]) -> dict[int, TokenRows]:
        return {0: outgoing[0]}


class ThreadGroup:
    """Mailboxes shared by ``num_dies`` threads; a barrier ends each round."""

    def __init__(self, num_dies: int, timeout_s: float = 60.0) -> None:
        self.num_dies = num_dies
        self.barrier = threading.Barrier(num_dies, timeout=timeout_s)
        self.boxes: list[dict[int, TokenRows]] = [{} for _ in range(num_dies)]

    def member(self, die_id: int) -> "ThreadExchange":
        return ThreadExchange(self, die_id)


class ThreadExchange:
    def __init__(self, group: ThreadGroup, die_id: int) -> None:
        self.group, self.die_id, self.num_dies = group, die_id, group.num_dies

    def all_to_all(self, kind: str, layer: int, outgoing: dict[int, TokenRows]) -> dict[int, TokenRows]:
        for dst, rows in outgoing.items():
            self.group.boxes[dst][self.die_id] = rows
        self.group.barrier.wait()  # every die has posted
        received = dict(self.group.boxes[self.die_id])
        self.group.boxes[self.die_id].clear()
        self.group.barrier.wait()  # every die has read before anyone posts the next round
        return received
