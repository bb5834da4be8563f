"""NpuClient: one emulated Ascend 910C die (an npu_emulator process).

    async with NpuClient("127.0.0.1:50061") as die:
        loaded = await die.load_model("runs/local/checkpoints/tiny")
        outputs, timing = await die.run_kernel("int8_gemm", {"a": a, "b": b})
        blocks = await die.allocate_blocks(4)

``forward`` takes the ``npu_pb2.SequenceInput`` messages the instance's scheduler builds (one
step of a batch is thousands of fields: building dataclasses first would only add a copy).
"""
from __future__ import annotations

import dataclasses

import torch

from cloudmatrix.clients.types import PRECISION_NAMES, PRECISIONS, DieInfo, Timing
from cloudmatrix.rpc.client import ServiceClient
from cloudmatrix.rpc.tensor_codec import decode_tensor, decode_tensors, encode_tensor, encode_tensors
from cmx.npu.v1 import npu_pb2, npu_pb2_grpc


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model_id: str
    weight_bytes: int
    kv_blocks_total: int
    num_local_experts: int
    from_model_cache: bool               # the weights came from the kvcache pool, not the checkpoint
    timing: Timing


@dataclasses.dataclass(frozen=True)
class ExpertLoad:
    """A die's expert counters: token_counts int64 [MoE layers, routed experts], row i is layers[i]."""

    layers: tuple[int, ...]
    token_counts: torch.Tensor


class NpuClient(ServiceClient):
    SERVICE = "cmx.npu.v1.NpuEmulator"
    STUB = npu_pb2_grpc.NpuEmulatorStub

    async def die_info(self, deadline_s: float | None = None) -> DieInfo:
        r = await self.unary("GetDieInfo", npu_pb2.GetDieInfoRequest(), idempotent=True, deadline_s=deadline_s)
        return DieInfo(r.die_id, r.num_dies, r.hbm_capacity_bytes, r.hbm_used_bytes, r.kv_blocks_total,
                       r.kv_blocks_free, r.kv_block_size, r.kv_block_bytes, r.model_id,
                       PRECISION_NAMES.get(r.precision, "unspecified"), r.num_local_experts)

    async def load_model(self, checkpoint: str, *, precision: str = "fp32", die_id: int = 0, num_dies: int = 1,
                         placement: dict[int, list[list[int]]] | None = None, block_size: int = 0,
                         pool_bytes: int = 0, fabric_address: str = "", fabric_group: str = "",
                         dispatch_dtype: str = "", model_cache: list[str] | None = None, cache_prefix: str = "",
                         model_id: str = "", speculative_tokens: int = 0,
                         deadline_s: float | None = None) -> LoadedModel:
        """Load a checkpoint onto this die as rank ``die_id`` of ``num_dies`` (``placement``:
        MoE layer -> expert -> the dies hosting it; ``model_cache``: kvcache shard addresses to
        read the weights from; ``speculative_tokens`` 1: the MTP module too). A multi-die load
        waits for the whole fabric group."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        entries = [npu_pb2.ExpertPlacement(layer=layer, expert=e, dies=list(dies))
                   for layer, experts in (placement or {}).items() for e, dies in enumerate(experts)]
        cache = npu_pb2.ModelCacheSource(kvcache_addresses=model_cache, blob_prefix=cache_prefix) \
            if model_cache else None
        request = npu_pb2.LoadModelRequest(
            checkpoint_path=checkpoint, model_id=model_id, precision=PRECISIONS[precision], die_id=die_id,
            num_dies=num_dies, placement=entries, kv_block_size=block_size, kv_pool_bytes=pool_bytes,
            fabric_address=fabric_address, fabric_group=fabric_group, dispatch_dtype=dispatch_dtype,
            model_cache=cache, speculative_tokens=speculative_tokens)
        r = await self.unary("LoadModel", request, idempotent=False, deadline_s=deadline_s)
        return LoadedModel(r.model_id, r.weight_bytes, r.kv_blocks_total, r.num_local_experts, r.from_model_cache,
                           Timing.from_proto(r.timing))

    async def allocate_blocks(self, num_blocks: int, deadline_s: float | None = None) -> list[int]:
        """Claim ``num_blocks`` KV blocks of the die's pool; their ids."""
        r = await self.unary("AllocateBlocks", npu_pb2.AllocateBlocksRequest(num_blocks=num_blocks),
                             idempotent=False, deadline_s=deadline_s)
        return list(r.block_ids)

    async def write_blocks(self, blocks: list[tuple[int, torch.Tensor]], deadline_s: float | None = None) -> int:
        """Fill blocks with KV: [(block id, kv [layers, n, C+R])]; bytes written (idempotent)."""
        request = npu_pb2.WriteBlocksRequest(blocks=[
            npu_pb2.KvBlockData(block_id=b, num_tokens=kv.shape[1], kv=encode_tensor(kv)) for b, kv in blocks])
        return (await self.unary("WriteBlocks", request, idempotent=True, deadline_s=deadline_s)).bytes_written

    async def read_blocks(self, blocks: list[tuple[int, int]], deadline_s: float | None = None) -> list[torch.Tensor]:
        """KV of (block id, valid tokens) blocks: [layers, n, C+R] each."""
        if not blocks:
            return []
        request = npu_pb2.ReadBlocksRequest(block_ids=[b for b, _ in blocks], num_tokens=[n for _, n in blocks])
        reply = await self.unary("ReadBlocks", request, idempotent=True, deadline_s=deadline_s)
        return [decode_tensor(b.kv, "kv") for b in reply.blocks]

    async def free_blocks(self, block_ids: list[int], deadline_s: float | None = None) -> int:
        """Return blocks to the die's pool; the free blocks left."""
        reply = await self.unary("FreeBlocks", npu_pb2.FreeBlocksRequest(block_ids=block_ids), idempotent=False,
                                 deadline_s=deadline_s)
        return reply.kv_blocks_free

    async def forward(self, step: int, sequences: list[npu_pb2.SequenceInput], *, microbatch: int = 0,
                      return_logits: bool = False, finished_seq_ids: list[str] = (),
                      deadline_s: float | None = None) -> npu_pb2.ForwardReply:
        """One model step of this die's sequences (joining the instance's MoE rounds), after it
        forgets ``finished_seq_ids``; not retried."""
        request = npu_pb2.ForwardRequest(step=step, microbatch=microbatch, sequences=sequences,
                                         return_logits=return_logits, finished_seq_ids=finished_seq_ids)
        return await self.unary("Forward", request, idempotent=False, deadline_s=deadline_s)

    async def run_kernel(self, kernel: str, inputs: dict[str, torch.Tensor], params: dict[str, str] | None = None,
                         deadline_s: float | None = None) -> tuple[dict[str, torch.Tensor], Timing]:
        """Run one kernel ("pasa_attention", "int8_gemm", ...) on named tensors; its outputs."""
        request = npu_pb2.RunKernelRequest(kernel=kernel, inputs=encode_tensors(inputs),
                                           params={k: str(v) for k, v in (params or {}).items()})
        reply = await self.unary("RunKernel", request, idempotent=True, deadline_s=deadline_s)
        return decode_tensors(reply.outputs, field="outputs"), Timing.from_proto(reply.timing)

    async def expert_load(self, reset: bool = False, deadline_s: float | None = None) -> ExpertLoad:
        """Tokens this die computed per expert: int64 [MoE layers, routed experts], with the layer ids."""
        reply = await self.unary("GetExpertLoad", npu_pb2.GetExpertLoadRequest(reset=reset), idempotent=not reset,
                                 deadline_s=deadline_s)
        return ExpertLoad(tuple(reply.layers), decode_tensor(reply.token_counts, "token_counts"))
