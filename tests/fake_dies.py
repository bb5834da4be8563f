"""A fake instance driver for the scheduler tests: dies that store token ids as their "KV" and
whose next token is a fixed function of a sequence's whole history, read back through its block
table. So a wrong block table, a lost prefix or a bad recompute changes the tokens, and the
expected tokens come from ``reference`` without any scheduler. Their "MTP module" drafts the
right next token two times in three (``fake_draft``); a draft they verify is written to the KV
like a token, so a scheduler that mishandles an accepted or rejected draft gets other tokens."""
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


def fake_draft(history: list[int]) -> int:
    """The fake MTP module's guess of the token after ``history``: right unless the history's
    length is a multiple of 3."""
    right = next_token(history)
    return right if len(history) % 3 else right % 97 + 4


def fake_step(slots: dict[int, int], chunk, block_size: int) -> SequenceOutput:
    """One chunk on a fake die whose KV ``slots`` (slot -> token) the chunk writes, its draft
    too: the sampled tokens (two when the draft was right), then the next draft."""
    table = chunk.request.blocks

    def slot(position: int) -> int:
        return table[position // block_size] * block_size + position % block_size

    fed = chunk.token_ids + ([chunk.draft] if chunk.draft is not None else [])
    for i, t in enumerate(fed):
        slots[slot(chunk.start + i)] = t
    if not chunk.sample:
        return SequenceOutput()
    history = [slots[slot(p)] for p in range(chunk.start + len(chunk.token_ids))]
    tokens = [next_token(history)]
    if chunk.draft is not None and chunk.draft == tokens[0]:
        tokens.append(next_token(history + tokens))
    return SequenceOutput(tuple(tokens), draft=fake_draft(history + tokens))


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
        self.block_reads: list[tuple[int, int]] = []      # (die, blocks) of each read_blocks call
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
        self.block_reads.append((die, len(blocks)))
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
        return StepOutput({c.request.request_id: fake_step(self.slots[c.request.die], c, self.block_size)
                           for c in chunks})

    async def probe(self, timeout_s: float) -> list[DieProbe]:
        self.probes += 1
        return [DieProbe(d, False, False, grpc.StatusCode.UNAVAILABLE) if d in self.down else
                DieProbe(d, False, False, grpc.StatusCode.DEADLINE_EXCEEDED) if d in self.slow else DieProbe(d, True, True)
                for d in self.dies]


def die_failure() -> StepFailed:
    return StepFailed([(1, ConnectionError("die 1 went away"))])
