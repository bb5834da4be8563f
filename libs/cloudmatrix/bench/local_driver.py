"""The instance scheduler over one in-process "die": the model and a paged latent KV pool in this
process, stepped by the same StepLoop the services run. The in-process baseline of `cmx bench
compare` (continuous batching without any RPC), and a way to study the scheduler alone.

Shape legend: N = new tokens of a step packed in one row, B = its sequences, V = vocab.
"""
from __future__ import annotations

import torch

from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.driver import DieProbe, ForwardResult
from cloudmatrix.kv.block_pool import PagedLatentPool, PoolShape
from cloudmatrix.kv.paged_view import PagedBatch, PagedKVView
from cloudmatrix.model.sampling import sample_token
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.rpc.sampling import sampling_from_proto
from cmx.npu.v1 import npu_pb2


class LocalDriver:
    """The driver interface of InstanceDriver (load, forward, write/read blocks, probe) on a model
    in this process."""

    def __init__(self, model: DeepseekV3, num_blocks: int, block_size: int = 16) -> None:
        cfg = model.cfg
        self.model, self.block_size, self.dies = model, block_size, [0]
        self.pool = PagedLatentPool(PoolShape(cfg.num_hidden_layers, num_blocks, block_size, cfg.kv_lora_rank,
                                              cfg.qk_rope_head_dim))
        self.model_id = "local"

    async def load(self) -> BlockManager:
        return BlockManager([list(range(self.pool.shape.num_blocks))], self.block_size)

    async def forward(self, per_die: list[list[npu_pb2.SequenceInput]], microbatch: int = 0) -> ForwardResult:
        seqs = per_die[0]
        batch = PagedBatch([list(s.block_table) for s in seqs], [s.start_position for s in seqs],
                           [len(s.token_ids) for s in seqs])
        with torch.inference_mode():
            ids = torch.tensor([t for s in seqs for t in s.token_ids])[None]  # [1, N]
            logits = self.model(ids, batch.positions(), PagedKVView(self.pool, batch))  # [1, N, V]
            last = logits[0, batch.last_token_index()]  # [B, V]
        outputs = {s.seq_id: self._output(s, row) for s, row in zip(seqs, last)}
        return ForwardResult(outputs, [npu_pb2.ForwardReply()])

    def _output(self, s: npu_pb2.SequenceInput, logits: torch.Tensor) -> npu_pb2.SequenceOutput:
        if s.skip_sampling:
            return npu_pb2.SequenceOutput(seq_id=s.seq_id)
        params = sampling_from_proto(s.sampling)
        position = s.start_position + len(s.token_ids)
        token = sample_token(logits, params, params.generator(position))
        return npu_pb2.SequenceOutput(seq_id=s.seq_id, token_id=token, has_token=True)

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
