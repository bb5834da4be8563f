"""A fake instance driver for the scheduler tests: dies that store token ids as their "KV" and
whose next token is a fixed function of a sequence's whole history, read back through its block
table. So a wrong block table, a lost prefix or a bad recompute changes the tokens, and the
expected tokens come from ``reference`` without any scheduler."""
from __future__ import annotations

import asyncio

import grpc
import torch

from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.driver import DieProbe, StepFailed
from cloudmatrix.instance.request import KvPrefix
from cloudmatrix.instance.step import SequenceOutput, StepOutput


def next_token(history: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(history)) * 31 + len(history)) % 97 + 3


def reference(prompt: list[int], new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def prefix_kv(tokens: list[int], block_size: int) -> list[torch.Tensor]:
    """Fake KV blocks [1, n, 1] holding the token ids."""
    return [torch.tensor(tokens[i:i + block_size], dtype=torch.float32)[None, :, None]
            for i in range(0, len(tokens), block_size)]


def pooled_prefix(tokens: list[int], block_size: int, keep_blocks: int | None = None) -> KvPrefix:
    """A KvPrefix whose fetch returns the fake KV of ``tokens`` (only the first ``keep_blocks``
    blocks: the pool evicted the rest); ``fetches`` counts its calls."""
    blocks = prefix_kv(tokens, block_size)[:keep_blocks]

    async def fetch():
        prefix.fetches.append(len(blocks))
        return blocks

    prefix = KvPrefix(len(tokens), fetch)
    object.__setattr__(prefix, "fetches", [])
    return prefix


class FakeDriver:
    def __init__(self, num_dies: int, blocks_per_die: int, block_size: int) -> None:
        self.block_size, self.blocks_per_die = block_size, blocks_per_die
        self.dies = list(range(num_dies))
        self.slots = [dict() for _ in self.dies]          # die -> {slot: token}
        self.fail_next: Exception | None = None
        self.down: set[int] = set()                      # probes: connection refused
        self.slow: set[int] = set()                      # probes: deadline exceeded
        self.probes = 0
        self.gate: asyncio.Event | None = None            # when set, forward waits for it
        self.entered = asyncio.Event()
        self.loads = self.forwards = 0
        self.step_sizes: list[int] = []                   # sequences in each forward
        self.released: list[tuple[int, str]] = []         # sequences the dies were told to forget
        self.model_id = "fake"

    async def load(self) -> BlockManager:
        self.loads += 1
        self.slots = [dict() for _ in self.dies]
        return BlockManager([list(range(self.blocks_per_die)) for _ in self.dies], self.block_size)

    def _slot(self, table: list[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    async def write_blocks(self, writes) -> None:
        for die, blocks in writes.items():
            for block, kv in blocks:
                for i, value in enumerate(kv[0, :, 0].tolist()):
                    self.slots[die][block * self.block_size + i] = int(value)

    async def read_blocks(self, die: int, blocks) -> list[torch.Tensor]:
        return [torch.tensor([self.slots[die][b * self.block_size + i] for i in range(n)],
                             dtype=torch.float32)[None, :, None] for b, n in blocks]

    async def forward(self, chunks, released=(), microbatch: int = 0) -> StepOutput:
        self.forwards += 1
        self.step_sizes.append(len(chunks))
        self.released += list(released)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        outputs = {}
        for c in chunks:
            die, table = c.request.die, list(c.request.blocks)
            for i, t in enumerate(c.token_ids):
                self.slots[die][self._slot(table, c.start + i)] = t
            history = [self.slots[die][self._slot(table, p)] for p in range(c.start + len(c.token_ids))]
            outputs[c.request.request_id] = SequenceOutput(next_token(history) if c.sample else None)
        return StepOutput(outputs)

    async def probe(self, timeout_s: float) -> list[DieProbe]:
        self.probes += 1
        return [DieProbe(d, False, False, grpc.StatusCode.UNAVAILABLE) if d in self.down else
                DieProbe(d, False, False, grpc.StatusCode.DEADLINE_EXCEEDED) if d in self.slow else DieProbe(d, True, True)
                for d in self.dies]


def die_failure() -> StepFailed:
    return StepFailed([(1, ConnectionError("die 1 went away"))])
