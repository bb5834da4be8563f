"""An instance = N dies sharing their experts over the fabric. The driver is the dies' client and
nothing more: it loads them (claiming every KV block of each die for the instance's scheduler),
runs one Forward per die per step with the block tables the plan carries (dies with nothing to do
still take part in the MoE rounds), writes and reads KV blocks, and probes the dies. Which block
holds what is the scheduler's business (scheduler.py), not the driver's.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

import grpc
import torch

from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.moe.placement import ExpertPlacement
from cloudmatrix.rpc.channel import make_channel
from cloudmatrix.rpc.tensor_codec import decode_tensor, encode_tensor
from cmx.common.v1 import common_pb2
from cmx.npu.v1 import npu_pb2, npu_pb2_grpc

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": common_pb2.PRECISION_FP32, "int8": common_pb2.PRECISION_INT8,
              "pasa": common_pb2.PRECISION_PASA, "int8-pasa": common_pb2.PRECISION_INT8_PASA}


@dataclasses.dataclass(frozen=True)
class ForwardResult:
    """One step of one microbatch: outputs by sequence id, and the slowest die's measured and
    modeled seconds."""

    outputs: dict[str, npu_pb2.SequenceOutput]
    replies: list[npu_pb2.ForwardReply]

    @property
    def modeled_s(self) -> float:
        return max((r.timing.modeled_s for r in self.replies), default=0.0)

    def die_phases(self) -> dict[str, float]:
        """Measured seconds per phase, mean over the dies: forward (a die's whole Forward),
        dispatch / combine (waiting for the fabric rounds), sample, and compute (the rest)."""
        sums: dict[str, float] = {}
        for reply in self.replies:
            phases = {p.phase: p.measured_s for p in reply.timing.phases}
            waits = {k: phases.get(k, 0.0) for k in ("dispatch", "combine", "sample")}
            parts = {"forward": reply.timing.measured_s, **waits,
                     "compute": max(0.0, reply.timing.measured_s - sum(waits.values()))}
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / max(len(self.replies), 1) for k, v in sums.items()}


@dataclasses.dataclass(frozen=True)
class DieProbe:
    die: int
    answered: bool
    loaded: bool                # holds the model this driver loaded (False after a restart)
    code: str = ""              # the failed probe's status code

    @property
    def healthy(self) -> bool:
        return self.answered and self.loaded

    def describe(self) -> str:
        return f"die {self.die} " + ("lost its model (restarted)" if self.answered else f"is down ({self.code})")


class InstanceDriver:
    def __init__(self, die_addresses: list[str], fabric_address: str = "", group: str = "instance",
                 timeout_s: float = 120.0) -> None:
        self.addresses, self.fabric_address, self.group = die_addresses, fabric_address, group
        self.timeout_s = timeout_s
        self.channels = [make_channel(a) for a in die_addresses]
        self.dies = [npu_pb2_grpc.NpuEmulatorStub(c) for c in self.channels]
        self.step_no = 0
        # One step per microbatch at a time: concurrent steps of one microbatch could reach the
        # dies in different orders and wait on each other's rounds.
        self._step_locks = collections.defaultdict(asyncio.Lock)
        self.replies_by_microbatch: dict[int, list[npu_pb2.ForwardReply]] = {}
        self.model_id = ""
        self.loaded: list[npu_pb2.LoadModelReply] = []  # the dies' answers to the last load

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))

    async def load(self, checkpoint: str, precision: str = "fp32", placement: ExpertPlacement | None = None,
                   block_size: int = 16, pool_bytes: int = 0, dispatch_dtype: str = "",
                   model_cache: list[str] | None = None, cache_prefix: str = "", max_blocks: int = 0) -> BlockManager:
        """LoadModel on every die at once (each waits for the whole fabric group; with
        ``model_cache``, kvcache shard addresses, the dies read their weights from the pool), then
        claim each die's KV blocks (at most ``max_blocks`` per die when > 0) for the instance."""
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
        loaded = await asyncio.gather(*(d.LoadModel(r, timeout=self.timeout_s) for d, r in zip(self.dies, requests)))
        self.model_id, self.loaded = loaded[0].model_id, loaded
        counts = [min(r.kv_blocks_total, max_blocks) if max_blocks > 0 else r.kv_blocks_total for r in loaded]
        claimed = await asyncio.gather(*(d.AllocateBlocks(npu_pb2.AllocateBlocksRequest(num_blocks=n),
                                                          timeout=self.timeout_s) for d, n in zip(self.dies, counts)))
        return BlockManager([list(c.block_ids) for c in claimed], block_size)

    async def forward(self, per_die: list[list[npu_pb2.SequenceInput]], microbatch: int = 0,
                      return_logits: bool = False) -> ForwardResult:
        """One Forward per die for one microbatch (``per_die[i]``: die i's sequences, maybe none).
        Steps of different microbatches may run at once (two-microbatch pipelining)."""
        async with self._step_locks[microbatch]:
            self.step_no += 1
            calls = [d.Forward(npu_pb2.ForwardRequest(step=self.step_no, microbatch=microbatch, sequences=seqs,
                                                      return_logits=return_logits), timeout=self.timeout_s)
                     for d, seqs in zip(self.dies, per_die)]
            results = await asyncio.gather(*calls, return_exceptions=True)
        _raise_for(results)
        self.replies_by_microbatch[microbatch] = results
        return ForwardResult({out.seq_id: out for reply in results for out in reply.outputs}, results)

    @property
    def last_replies(self) -> list[npu_pb2.ForwardReply]:
        """The dies' replies to the last step of microbatch 0."""
        return self.replies_by_microbatch[0]

    async def write_blocks(self, writes: dict[int, list[tuple[int, torch.Tensor]]]) -> None:
        """Fill blocks with KV: die -> [(block id, kv [layers, n, C+R])]; one WriteBlocks per die."""
        calls = {die: self.dies[die].WriteBlocks(npu_pb2.WriteBlocksRequest(blocks=[
            npu_pb2.KvBlockData(block_id=b, num_tokens=kv.shape[1], kv=encode_tensor(kv)) for b, kv in blocks]),
            timeout=self.timeout_s) for die, blocks in writes.items() if blocks}
        _raise_for(dict(zip(calls, await asyncio.gather(*calls.values(), return_exceptions=True))))

    async def read_blocks(self, die: int, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
        """KV of (block id, valid tokens) blocks on one die: [layers, n, C+R] each."""
        if not blocks:
            return []
        request = npu_pb2.ReadBlocksRequest(block_ids=[b for b, _ in blocks], num_tokens=[n for _, n in blocks])
        try:
            reply = await self.dies[die].ReadBlocks(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise StepFailed([(die, err)]) from err
        return [decode_tensor(b.kv, "kv") for b in reply.blocks]

    async def probe(self, timeout_s: float) -> list[DieProbe]:
        """GetDieInfo on every die: does it answer, and does it still hold this instance's model?"""
        replies = await asyncio.gather(*(d.GetDieInfo(npu_pb2.GetDieInfoRequest(), timeout=timeout_s)
                                         for d in self.dies), return_exceptions=True)
        probes = []
        for die, reply in enumerate(replies):
            if isinstance(reply, grpc.aio.AioRpcError):
                probes.append(DieProbe(die, False, False, reply.code().name))
            elif isinstance(reply, BaseException):
                raise reply
            else:
                probes.append(DieProbe(die, True, bool(self.model_id) and reply.model_id == self.model_id))
        return probes

    async def expert_load(self, reset: bool = False) -> torch.Tensor:
        """Tokens per expert summed over the dies: int64 [MoE layers, routed experts] (EPLB's input)."""
        replies = await asyncio.gather(*(d.GetExpertLoad(npu_pb2.GetExpertLoadRequest(reset=reset),
                                                         timeout=self.timeout_s) for d in self.dies))
        return sum(decode_tensor(r.token_counts, "token_counts") for r in replies)


def _raise_for(results) -> None:
    """StepFailed naming every die whose call failed (results: a list by die, or a die -> result dict)."""
    items = results.items() if isinstance(results, dict) else enumerate(results)
    errors = [(die, r) for die, r in items if isinstance(r, BaseException)]
    if errors:
        raise StepFailed(errors)


class StepFailed(RuntimeError):
    """Calls failed on some dies: errors = [(die, exception)]. ``str()`` has the full details
    (for logs); ``summary`` names only the dies and status codes (for clients)."""

    def __init__(self, errors: list[tuple[int, BaseException]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"die {i}: {_code(e)}: {e.details() if isinstance(e, grpc.aio.AioRpcError) else e}"
                                   for i, e in errors))

    @property
    def summary(self) -> str:
        return ", ".join(f"die {i} failed ({_code(e)})" for i, e in self.errors)

    @property
    def codes(self) -> set:
        return {e.code() for _, e in self.errors if isinstance(e, grpc.aio.AioRpcError)}


def _code(e: BaseException) -> str:
    return e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__
