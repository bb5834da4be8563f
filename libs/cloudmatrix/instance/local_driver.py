"""The instance scheduler over one in-process "die": the model and a paged latent KV pool in this
process, stepped by the same StepLoop the services run. `cmx generate --local`, the in-process
rows of `cmx bench compare` (continuous batching without any RPC), and a way to study the
scheduler alone.

Shape legend: N = new tokens of a step packed in one row, B = its sequences, V = vocab.
"""
from __future__ import annotations

import torch

from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.driver import DieProbe
from cloudmatrix.instance.step import ScheduledChunk, SequenceOutput, StepOutput
from cloudmatrix.kv.block_pool import PagedLatentPool, PoolShape
from cloudmatrix.model.paged_step import StepRow, paged_step
from cloudmatrix.model.transformer import DeepseekV3


class LocalDriver:
    """The Driver protocol (instance/step.py: forward, write/read blocks, probe) and a load, on a
    model in this process; a model with its MTP module speculates (one draft token per step, the
    scheduler's ``speculative_tokens`` 1). Prompt log-probabilities are not computed here."""

    def __init__(self, model: DeepseekV3, num_blocks: int, block_size: int = 16) -> None:
        cfg = model.cfg
        self.model, self.block_size, self.dies = model, block_size, [0]
        self.pool = PagedLatentPool(PoolShape(cfg.num_hidden_layers + len(model.mtp), num_blocks, block_size,
                                              cfg.kv_lora_rank, cfg.qk_rope_head_dim))
        self.model_id = "local"

    async def load(self) -> BlockManager:
        return BlockManager([list(range(self.pool.shape.num_blocks))], self.block_size)

    async def forward(self, chunks: list[ScheduledChunk], released=(), microbatch: int = 0) -> StepOutput:
        rows = [StepRow(c.token_ids, c.start, list(c.request.blocks), c.request.sampling, c.sample, c.draft,
                        c.following) for c in chunks]
        with torch.inference_mode():
            results = paged_step(self.model, self.pool, rows)
        return StepOutput({c.request.request_id: SequenceOutput(tuple(r.tokens), draft=r.draft)
                           for c, r in zip(chunks, results)})

    async def write_blocks(self, writes: dict[int, list[tuple[int, torch.Tensor]]]) -> None:
        shape = self.pool.shape
        for block, kv in writes.get(0, []):  # kv: [L, n, C+R]
            slots = torch.arange(kv.shape[1]) + block * shape.block_size
            for layer in range(shape.num_layers):
                self.pool.write(layer, slots, kv[layer, :, :shape.latent_dim], kv[layer, :, shape.latent_dim:])

    async def read_blocks(self, die: int, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
        size, out = self.pool.shape.block_size, []
        for block, n in blocks:
            slots = block * size + torch.arange(n)
            out.append(torch.cat([self.pool.latent[:, slots], self.pool.k_rope[:, slots]], dim=-1))  # [L, n, C+R]
        return out

    async def probe(self, timeout_s: float) -> list[DieProbe]:
        return [DieProbe(0, True, True)]
