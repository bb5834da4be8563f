"""A die's paged latent KV pool: fixed-size blocks of compressed latent + rope key per token.

Shape legend: L = layers, N = blocks, P = block size (tokens), C = kv_lora_rank, R = rope dim.
"""
from __future__ import annotations

import dataclasses
from collections import deque

import torch


@dataclasses.dataclass(frozen=True)
class PoolShape:
    num_layers: int
    num_blocks: int
    block_size: int
    latent_dim: int
    rope_dim: int

    @property
    def bytes_per_block(self) -> int:
        """fp32 bytes one block holds across all layers."""
        return 4 * self.num_layers * self.block_size * (self.latent_dim + self.rope_dim)


class BlockAllocator:
    """Free list of block ids; ``allocate`` returns None when there are too few ("not now")."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(count)]
        self._used.update(blocks)
        return blocks

    def is_allocated(self, block: int) -> bool:
        return block in self._used

    def free(self, blocks: list[int]) -> None:
        unknown = [b for b in blocks if b not in self._used]
        if unknown or len(set(blocks)) != len(blocks):
            raise ValueError(f"blocks {unknown or blocks} are not allocated (double free?)")
        self._used.difference_update(blocks)
        self._free.extend(blocks)


class PagedLatentPool:
    """The KV storage: latent [L, N*P, C] and k_rope [L, N*P, R], addressed by slot = block*P + offset."""

    def __init__(self, shape: PoolShape, dtype: torch.dtype = torch.float32) -> None:
        self.shape = shape
        slots = shape.num_blocks * shape.block_size
        self.latent = torch.zeros(shape.num_layers, slots, shape.latent_dim, dtype=dtype)
        self.k_rope = torch.zeros(shape.num_layers, slots, shape.rope_dim, dtype=dtype)
        self.allocator = BlockAllocator(shape.num_blocks)

    def slots(self, block_table: list[int], start: int, count: int) -> torch.Tensor:
        """Slot ids of token positions [start, start + count) of a sequence: [count]."""
        positions = torch.arange(start, start + count)
        needed = (start + count + self.shape.block_size - 1) // self.shape.block_size
        if needed > len(block_table):
            raise ValueError(f"block table has {len(block_table)} blocks; positions up to {start + count} need {needed}")
        table = torch.tensor(block_table, dtype=torch.long)
        return table[positions // self.shape.block_size] * self.shape.block_size + positions % self.shape.block_size

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        # slots: [n], latent: [n, C], k_rope: [n, R]
        self.latent[layer, slots] = latent.to(self.latent.dtype)
        self.k_rope[layer, slots] = k_rope.to(self.k_rope.dtype)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots: [B, T] -> latent [B, T, C], k_rope [B, T, R]."""
        return self.latent[layer, slots], self.k_rope[layer, slots]
