"""gRPC servicer for one die: protos in, dataclasses and tensors to the core, errors to status codes."""
from __future__ import annotations

import asyncio

import grpc

from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.errors import map_errors
from cloudmatrix.rpc.tensor_codec import (
    decode_tensor,
    decode_tensors,
    encode_tensor,
    encode_tensors,
)
from cloudmatrix.rpc.timing import timing_proto
from cmx.common.v1 import common_pb2
from cmx.npu.v1 import npu_pb2, npu_pb2_grpc
from services.npu_emulator.config import NpuEmulatorConfig
from services.npu_emulator.convert import PRECISION_ENUMS, load_spec, sequence_output, sequence_step
from services.npu_emulator.core import Die
from services.npu_emulator.loader import load_engine
from services.npu_emulator.metrics import DieCounters


class NpuEmulatorServicer(npu_pb2_grpc.NpuEmulatorServicer):
    def __init__(self, die: Die, config: NpuEmulatorConfig, counters: DieCounters | None = None) -> None:
        self.counters = counters or DieCounters()
        self.die, self.config = die, config
        self.max_tensor_bytes = config.server.max_message_bytes
        self.forward_calls = 0

    async def _engine(self, context):
        if self.die.engine is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no model loaded: call LoadModel first")
        return self.die.engine

    @map_errors
    async def GetDieInfo(self, request, context):
        ident, engine = self.die.identity, self.die.engine
        reply = npu_pb2.GetDieInfoReply(die_id=ident.die_id, num_dies=ident.num_dies,
                                        hbm_capacity_bytes=ident.hbm_capacity_bytes)
        if engine is not None:
            shape = engine.pool.shape
            reply.hbm_used_bytes = engine.weight_bytes + shape.num_blocks * shape.bytes_per_block
            reply.kv_blocks_total, reply.kv_blocks_free = shape.num_blocks, engine.pool.allocator.num_free
            reply.kv_block_size, reply.kv_block_bytes = shape.block_size, shape.bytes_per_block
            reply.model_id, reply.precision = self.die.model_id, PRECISION_ENUMS[self.die.precision]
            reply.num_local_experts = self.die.num_local_experts()
        return reply

    @map_errors
    async def LoadModel(self, request, context):
        spec = load_spec(request, self.config)
        self.die.unload()  # leave the old fabric group before joining the new one
        engine, seconds, cached = await asyncio.to_thread(
            load_engine, spec, self.die.identity.hbm_capacity_bytes, self.config.round_timeout_s,
            self.config.fabric_connect_timeout_s, self.config.server.max_message_bytes)
        self.die.install(engine, request.model_id or spec.checkpoint, spec.precision)
        return npu_pb2.LoadModelReply(model_id=self.die.model_id, weight_bytes=engine.weight_bytes,
                                      kv_blocks_total=engine.pool.shape.num_blocks,
                                      num_local_experts=self.die.num_local_experts(), from_model_cache=cached,
                                      timing=common_pb2.Timing(measured_s=seconds))

    @map_errors
    async def AllocateBlocks(self, request, context):
        engine = await self._engine(context)
        blocks = engine.allocate(request.num_blocks)
        return npu_pb2.AllocateBlocksReply(block_ids=blocks, kv_blocks_free=engine.pool.allocator.num_free)

    @map_errors
    async def FreeBlocks(self, request, context):
        engine = await self._engine(context)
        engine.pool.allocator.free(list(request.block_ids))
        return npu_pb2.FreeBlocksReply(kv_blocks_free=engine.pool.allocator.num_free)

    @map_errors
    async def WriteBlocks(self, request, context):
        engine = await self._engine(context)
        blocks = [(b.block_id, decode_tensor(b.kv, f"blocks[{i}].kv", self.max_tensor_bytes).float())
                  for i, b in enumerate(request.blocks)]
        written = await asyncio.to_thread(engine.write_blocks, blocks)
        return npu_pb2.WriteBlocksReply(bytes_written=written)

    @map_errors
    async def ReadBlocks(self, request, context):
        engine = await self._engine(context)
        counts = list(request.num_tokens) or [engine.pool.shape.block_size] * len(request.block_ids)
        if len(counts) != len(request.block_ids):
            raise FieldError("num_tokens", "must be empty or one entry per block id")
        kvs = await asyncio.to_thread(engine.read_blocks, list(zip(request.block_ids, counts)))
        return npu_pb2.ReadBlocksReply(blocks=[
            npu_pb2.KvBlockData(block_id=b, num_tokens=n, kv=encode_tensor(kv))
            for b, n, kv in zip(request.block_ids, counts, kvs)])

    @map_errors
    async def Forward(self, request, context):
        engine = await self._engine(context)
        self.forward_calls += 1
        if self.forward_calls in self.config.fail_forwards:  # the fault hook (config.py)
            raise TypeError(f"fault hook: Forward call {self.forward_calls} fails as a bug would")
        seqs = [sequence_step(s) for s in request.sequences]
        results, measured, modeled = await asyncio.to_thread(engine.forward, request.step, request.microbatch, seqs,
                                                             request.return_logits, list(request.finished_seq_ids))
        self.counters.record(len(seqs), sum(len(s.token_ids) for s in seqs), measured, modeled.get("total", 0.0))
        outputs = [sequence_output(r) for r in results]
        return npu_pb2.ForwardReply(outputs=outputs, timing=timing_proto(
            measured, modeled, measured_s=measured.get("total", 0.0), modeled_s=modeled.get("total", 0.0)))

    @map_errors
    async def GetExpertLoad(self, request, context):
        engine = await self._engine(context)
        counts = engine.expert_load(request.reset)
        return npu_pb2.GetExpertLoadReply(token_counts=encode_tensor(counts), since_step=engine.first_step or 0,
                                          until_step=engine.last_step or 0, layers=list(engine.moe_layers))

    @map_errors
    async def RunKernel(self, request, context):
        if not request.kernel:
            raise FieldError("kernel", "must name a kernel")
        inputs = decode_tensors(request.inputs, self.max_tensor_bytes, field="inputs")
        # Kernels are CPU-bound: run them off the event loop so health checks stay answered.
        result = await asyncio.to_thread(self.die.run_kernel, request.kernel, inputs, dict(request.params))
        return npu_pb2.RunKernelReply(
            outputs=encode_tensors(result.outputs),
            timing=common_pb2.Timing(measured_s=result.measured_s, modeled_s=result.modeled_s),
        )
