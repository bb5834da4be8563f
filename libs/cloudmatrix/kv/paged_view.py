"""A batch's view of the paged pool, as the attention layers use it.

Rows of a batch are right-padded to S new tokens; row b has ``cached[b]`` tokens already in its
blocks and ``new[b]`` valid new tokens. Shape legend: B = rows, S = new tokens per row (padded),
T = longest cached + new length, C = kv_lora_rank, R = rope dim.
"""
from __future__ import annotations

import dataclasses

import torch

from cloudmatrix.kv.block_pool import PagedLatentPool


@dataclasses.dataclass(frozen=True)
class PagedBatch:
    block_tables: list[list[int]]
    cached: list[int]
    new: list[int]

    def __post_init__(self) -> None:
        if not len(self.block_tables) == len(self.cached) == len(self.new):
            raise ValueError("block_tables, cached and new must have one entry per sequence")

    def positions(self, width: int) -> torch.Tensor:
        """[B, width] absolute positions of the new tokens (padding repeats the last valid one)."""
        offsets = torch.arange(width)[None, :].clamp(max=torch.tensor(self.new)[:, None] - 1).clamp(min=0)
        return torch.tensor(self.cached)[:, None] + offsets


class PagedKVView:
    """Writes a step's new latents into the pool and gathers every row's full latent history."""

    def __init__(self, pool: PagedLatentPool, batch: PagedBatch) -> None:
        self.pool, self.batch = pool, batch
        width = max(batch.new)
        self.new_valid = torch.arange(width)[None, :] < torch.tensor(batch.new)[:, None]  # [B, S]
        self.write_slots = torch.cat([pool.slots(t, c, n) for t, c, n in zip(batch.block_tables, batch.cached, batch.new)])
        totals = [c + n for c, n in zip(batch.cached, batch.new)]
        longest = max(totals)
        self.gather_slots = torch.stack([self._padded(pool.slots(t, 0, n), longest) for t, n in zip(batch.block_tables, totals)])
        self.key_valid = torch.arange(longest)[None, :] < torch.tensor(totals)[:, None]  # [B, T]

    @staticmethod
    def _padded(slots: torch.Tensor, length: int) -> torch.Tensor:
        return torch.cat([slots, slots.new_zeros(length - slots.numel())])

    def update(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor):
        """latent: [B, S, C], k_rope: [B, S, R], positions: [B, S] ->
        (latent [B, T, C], k_rope [B, T, R], mask [B, S, T] True = may attend)."""
        self.pool.write(layer, self.write_slots, latent[self.new_valid], k_rope[self.new_valid])
        all_latent, all_rope = self.pool.gather(layer, self.gather_slots)
        key_pos = torch.arange(all_latent.shape[1])
        mask = self.key_valid[:, None, :] & (key_pos[None, None, :] <= positions[:, :, None])
        return all_latent, all_rope, mask
