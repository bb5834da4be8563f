"""A batch's view of the paged pool, as the attention layers use it.

A ragged batch is packed: the new tokens of every sequence, one after another, as one row
[1, N] (N = sum of new tokens), so nothing but attention ever sees padding. Sequence b has
``cached[b]`` tokens already in its blocks and ``new[b]`` new tokens. Attention unpacks to
[B, S, ...] (S = most new tokens of any sequence) and packs back.
Shape legend: B = sequences, S = padded new tokens, N = packed tokens, T = longest cached + new
length, C = kv_lora_rank, R = rope dim.
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

    def positions(self) -> torch.Tensor:
        """[1, N] absolute positions of the packed new tokens."""
        return torch.cat([torch.arange(c, c + n) for c, n in zip(self.cached, self.new)])[None]

    def last_token_index(self) -> torch.Tensor:
        """[B] index in the packed row of each sequence's last new token."""
        return torch.tensor(self.new).cumsum(0) - 1


class PagedKVView:
    """Writes a step's new latents into the pool and gathers every row's full latent history."""

    def __init__(self, pool: PagedLatentPool, batch: PagedBatch) -> None:
        self.pool, self.batch = pool, batch
        width = max(batch.new)
        self.new_valid = torch.arange(width)[None, :] < torch.tensor(batch.new)[:, None]  # [B, S]
        self.padded_positions = self.unpack(batch.positions()[..., None])[..., 0]  # [B, S]
        self.write_slots = torch.cat([pool.slots(t, c, n) for t, c, n in zip(batch.block_tables, batch.cached, batch.new)])
        totals = [c + n for c, n in zip(batch.cached, batch.new)]
        longest = max(totals)
        self.gather_slots = torch.stack([self._padded(pool.slots(t, 0, n), longest) for t, n in zip(batch.block_tables, totals)])
        self.key_valid = torch.arange(longest)[None, :] < torch.tensor(totals)[:, None]  # [B, T]

    @staticmethod
    def _padded(slots: torch.Tensor, length: int) -> torch.Tensor:
        return torch.cat([slots, slots.new_zeros(length - slots.numel())])

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] packed -> [B, S, ...] (padding rows are zeros)."""
        out = t.new_zeros(*self.new_valid.shape, *t.shape[2:])
        out[self.new_valid] = t[0]
        return out

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [1, N, ...]: the valid rows, in sequence order."""
        return t[self.new_valid][None]

    def update(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor):
        """latent: [1, N, C], k_rope: [1, N, R] (packed) ->
        (latent [B, T, C], k_rope [B, T, R], mask [B, S, T] True = may attend)."""
        self.pool.write(layer, self.write_slots, latent[0], k_rope[0])
        all_latent, all_rope = self.pool.gather(layer, self.gather_slots)
        key_pos = torch.arange(all_latent.shape[1])
        mask = self.key_valid[:, None, :] & (key_pos[None, None, :] <= self.padded_positions[:, :, None])
        return all_latent, all_rope, mask
