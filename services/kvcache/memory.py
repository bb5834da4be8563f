"""The memory tier: blocks in RAM under a capacity in data bytes, least recently used first."""
from __future__ import annotations

from collections import OrderedDict

from services.kvcache.blocks import Block


class MemoryTier:
    """Not thread-safe on its own: the shard's store serializes every call."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.used_bytes = 0

    def add(self, block: Block) -> None:
        if block.key in self.blocks:
            raise RuntimeError(f"block {block.key.hex()} is already in memory")
        self.blocks[block.key] = block
        self.used_bytes += len(block.data)

    def pop(self, key: bytes) -> Block | None:
        block = self.blocks.pop(key, None)
        if block is not None:
            self.used_bytes -= len(block.data)
        return block

    def touch(self, key: bytes) -> None:
        self.blocks.move_to_end(key)

    def victims(self, size: int, pinned: frozenset[bytes]) -> list[bytes] | None:
        """The least recently used unpinned keys to evict so ``size`` more bytes fit; None if
        evicting every unpinned block would not be enough."""
        need = self.used_bytes + size - self.capacity_bytes
        chosen, freed = [], 0
        for key, block in self.blocks.items():
            if freed >= need:
                break
            if key not in pinned:
                chosen.append(key)
                freed += len(block.data)
        return chosen if freed >= need else None
