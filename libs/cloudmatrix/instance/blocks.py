"""The instance's accounting of its dies' KV blocks (the scheduler's block manager).

The dies only store KV: at load the instance claims every block of every die (one AllocateBlocks
per die), and from then on which block holds which request's tokens is decided here, in plain
Python, between steps. A request's KV lives on one die (attention is data-parallel).
"""
from __future__ import annotations

from collections import deque


class BlockAccountingError(RuntimeError):
    """An invariant of the block accounting broke (a bug): more blocks asked than free, or freed
    twice."""


class BlockManager:
    """Free lists of block ids, one per die; "not now" answers are booleans or None."""

    def __init__(self, blocks_per_die: list[list[int]], block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.total = [len(blocks) for blocks in blocks_per_die]
        self._free = [deque(blocks) for blocks in blocks_per_die]

    @property
    def num_dies(self) -> int:
        return len(self._free)

    def num_free(self, die: int) -> int:
        return len(self._free[die])

    @property
    def free_per_die(self) -> list[int]:
        return [len(f) for f in self._free]

    @property
    def used(self) -> int:
        return sum(self.total) - sum(self.free_per_die)

    @property
    def usage(self) -> float:
        """Fraction of all dies' blocks in use."""
        total = sum(self.total)
        return self.used / total if total else 0.0

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens."""
        return -(-tokens // self.block_size)

    def can_allocate(self, die: int, count: int) -> bool:
        return count <= len(self._free[die])

    def allocate(self, die: int, count: int) -> list[int]:
        if not self.can_allocate(die, count):
            raise BlockAccountingError(f"die {die}: {count} blocks asked, {self.num_free(die)} free")
        return [self._free[die].popleft() for _ in range(count)]

    def free(self, die: int, blocks: list[int]) -> None:
        if len(self._free[die]) + len(blocks) > self.total[die]:
            raise BlockAccountingError(f"die {die}: more blocks freed than it has (double free)")
        self._free[die].extend(blocks)

    def roomiest_die(self, count: int) -> int | None:
        """The die with the most free blocks, if it can take ``count`` more; else None."""
        die = max(range(self.num_dies), key=lambda d: len(self._free[d]), default=None)
        return die if die is not None and self.can_allocate(die, count) else None
