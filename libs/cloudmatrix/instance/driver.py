"""An instance = N dies sharing their experts over the fabric. The driver owns the dies' clients,
places each sequence on one die (attention is data-parallel: a sequence's KV lives on its die),
keeps every sequence's block table, and steps a batch by calling Forward on every die at once
(dies with nothing to do still take part in the MoE rounds)."""
from __future__ import annotations

import asyncio
import collections
import dataclasses

import grpc
import torch

from cloudmatrix.model.sampling import SamplingParams
from cloudmatrix.moe.placement import ExpertPlacement
from cloudmatrix.rpc.channel import make_channel
from cloudmatrix.rpc.tensor_codec import decode_tensor, encode_tensor
from cmx.common.v1 import common_pb2
from cmx.npu.v1 import npu_pb2, npu_pb2_grpc

PRECISIONS = {"fp32": common_pb2.PRECISION_FP32, "int8": common_pb2.PRECISION_INT8,
              "pasa": common_pb2.PRECISION_PASA, "int8-pasa": common_pb2.PRECISION_INT8_PASA}


@dataclasses.dataclass
class SequenceState:
    die: int
    blocks: list[int]
    cached: int = 0


@dataclasses.dataclass(frozen=True)
class StepInput:
    seq_id: str
    token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    skip_sampling: bool = False


def _sampling_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    proto = common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_tokens=p.max_tokens)
    if p.seed is not None:
        proto.seed = p.seed
    return proto


class InstanceDriver:
    def __init__(self, die_addresses: list[str], fabric_address: str = "", group: str = "instance",
                 timeout_s: float = 120.0) -> None:
        self.addresses, self.fabric_address, self.group = die_addresses, fabric_address, group
        self.timeout_s = timeout_s
        self.channels = [make_channel(a) for a in die_addresses]
        self.dies = [npu_pb2_grpc.NpuEmulatorStub(c) for c in self.channels]
        self.sequences: dict[str, SequenceState] = {}
        self.block_size = 0
        self.step_no = 0
        # One step at a time: concurrent steps could reach the dies in different orders and wait
        # on each other's rounds.
        self._step_locks = collections.defaultdict(asyncio.Lock)  # one step per microbatch at a time
        self.replies_by_microbatch: dict[int, list[npu_pb2.ForwardReply]] = {}

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))

    async def load(self, checkpoint: str, precision: str = "fp32", placement: ExpertPlacement | None = None,
                   block_size: int = 16, pool_bytes: int = 0, dispatch_dtype: str = "",
                   model_cache: list[str] | None = None, cache_prefix: str = "") -> list:
        """LoadModel on every die at once (each waits for the whole fabric group); with
        ``model_cache`` (kvcache shard addresses) the dies read their weights from the pool."""
        cache = npu_pb2.ModelCacheSource(kvcache_addresses=model_cache, blob_prefix=cache_prefix) if model_cache \
            else None
        entries = [npu_pb2.ExpertPlacement(layer=layer, expert=e, dies=list(dies))
                   for layer, experts in (placement.replicas.items() if placement else ())
                   for e, dies in enumerate(experts)]
        requests = [npu_pb2.LoadModelRequest(
            checkpoint_path=checkpoint, precision=PRECISIONS[precision], die_id=i, num_dies=len(self.dies),
            placement=entries, kv_block_size=block_size, kv_pool_bytes=pool_bytes,
            fabric_address=self.fabric_address if len(self.dies) > 1 else "", fabric_group=self.group,
            dispatch_dtype=dispatch_dtype, model_cache=cache) for i in range(len(self.dies))]
        self.block_size = block_size
        return await asyncio.gather(*(d.LoadModel(r, timeout=self.timeout_s) for d, r in zip(self.dies, requests)))

    def _least_loaded_die(self) -> int:
        counts = [0] * len(self.dies)
        for s in self.sequences.values():
            counts[s.die] += 1
        return counts.index(min(counts))

    async def _ensure_blocks(self, seq: SequenceState, tokens: int) -> None:
        needed = -(-tokens // self.block_size) - len(seq.blocks)
        if needed > 0:
            reply = await self.dies[seq.die].AllocateBlocks(npu_pb2.AllocateBlocksRequest(num_blocks=needed),
                                                             timeout=self.timeout_s)
            seq.blocks.extend(reply.block_ids)

    async def adopt(self, seq_id: str, blocks: list[torch.Tensor]) -> None:
        """Start a sequence whose first tokens' KV is given (blocks [layers, tokens, C+R], e.g. from
        the pool; all full but maybe the last): allocate blocks on its die and write them."""
        seq = self.sequences.setdefault(seq_id, SequenceState(self._least_loaded_die(), []))
        if seq.cached:
            raise ValueError(f"sequence {seq_id!r} already has KV; adopt only starts sequences")
        if any(kv.shape[1] != self.block_size for kv in blocks[:-1]):
            raise ValueError("adopt: every block but the last must be full")
        await self._ensure_blocks(seq, len(blocks) * self.block_size)
        request = npu_pb2.WriteBlocksRequest(blocks=[
            npu_pb2.KvBlockData(block_id=b, num_tokens=kv.shape[1], kv=encode_tensor(kv))
            for b, kv in zip(seq.blocks, blocks)])
        await self.dies[seq.die].WriteBlocks(request, timeout=self.timeout_s)
        seq.cached = sum(kv.shape[1] for kv in blocks)

    async def export(self, seq_id: str, first_block: int) -> list[torch.Tensor]:
        """KV of the sequence's blocks from ``first_block`` on: [layers, tokens, C+R] each (the last
        block may be partial)."""
        seq = self.sequences[seq_id]
        ids = seq.blocks[first_block:-(-seq.cached // self.block_size)]
        counts = [min(self.block_size, seq.cached - (first_block + i) * self.block_size) for i in range(len(ids))]
        if not ids:
            return []
        reply = await self.dies[seq.die].ReadBlocks(npu_pb2.ReadBlocksRequest(block_ids=ids, num_tokens=counts),
                                                     timeout=self.timeout_s)
        return [decode_tensor(b.kv, "kv") for b in reply.blocks]

    async def step(self, inputs: list[StepInput], return_logits: bool = False,
                   microbatch: int = 0) -> dict[str, npu_pb2.SequenceOutput]:
        """One engine step: new tokens for some sequences (new ids start new sequences). Steps of
        different microbatches may run at once (two-microbatch pipelining)."""
        async with self._step_locks[microbatch]:
            return await self._step(inputs, return_logits, microbatch)

    async def _step(self, inputs: list[StepInput], return_logits: bool,
                    microbatch: int) -> dict[str, npu_pb2.SequenceOutput]:
        per_die: list[list[npu_pb2.SequenceInput]] = [[] for _ in self.dies]
        for item in inputs:
            seq = self.sequences.setdefault(item.seq_id, SequenceState(self._least_loaded_die(), []))
            await self._ensure_blocks(seq, seq.cached + len(item.token_ids))
            per_die[seq.die].append(npu_pb2.SequenceInput(
                seq_id=item.seq_id, token_ids=item.token_ids, start_position=seq.cached, block_table=seq.blocks,
                sampling=_sampling_proto(item.sampling), skip_sampling=item.skip_sampling))
        self.step_no += 1
        replies = await self._forward_all(per_die, return_logits, self.step_no, microbatch)
        for item in inputs:
            self.sequences[item.seq_id].cached += len(item.token_ids)
        return {out.seq_id: out for reply in replies for out in reply.outputs}

    async def _forward_all(self, per_die, return_logits: bool, step: int, microbatch: int) -> list:
        calls = [d.Forward(npu_pb2.ForwardRequest(step=step, microbatch=microbatch, sequences=seqs,
                                                  return_logits=return_logits), timeout=self.timeout_s)
                 for d, seqs in zip(self.dies, per_die)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        errors = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if errors:
            raise StepFailed(errors)
        self.replies_by_microbatch[microbatch] = results
        return results

    @property
    def last_replies(self) -> list[npu_pb2.ForwardReply]:
        """The dies' replies to the last step of microbatch 0."""
        return self.replies_by_microbatch[0]

    async def expert_load(self, reset: bool = False) -> torch.Tensor:
        """Tokens per expert summed over the dies: int64 [MoE layers, routed experts] (EPLB's input)."""
        replies = await asyncio.gather(*(d.GetExpertLoad(npu_pb2.GetExpertLoadRequest(reset=reset),
                                                         timeout=self.timeout_s) for d in self.dies))
        return sum(decode_tensor(r.token_counts, "token_counts") for r in replies)

    async def release(self, seq_id: str) -> None:
        """Free a finished sequence's blocks on its die."""
        seq = self.sequences.pop(seq_id)
        if seq.blocks:
            await self.dies[seq.die].FreeBlocks(npu_pb2.FreeBlocksRequest(block_ids=seq.blocks), timeout=self.timeout_s)


class StepFailed(RuntimeError):
    """Forward failed on some dies: errors = [(die, exception)]."""

    def __init__(self, errors: list[tuple[int, BaseException]]) -> None:
        self.errors = errors
        parts = [f"die {i}: {e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__}: "
                 f"{e.details() if isinstance(e, grpc.aio.AioRpcError) else e}" for i, e in errors]
        super().__init__("; ".join(parts))
