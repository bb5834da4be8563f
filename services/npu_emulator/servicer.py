"""gRPC servicer for one die: protos in, dataclasses and tensors to the core, errors to status codes."""
from __future__ import annotations

import asyncio

from cloudmatrix.rpc.errors import map_errors
from cloudmatrix.rpc.tensor_codec import decode_tensors, encode_tensors
from cmx.common.v1 import common_pb2
from cmx.npu.v1 import npu_pb2, npu_pb2_grpc

from services.npu_emulator.core import Die


class NpuEmulatorServicer(npu_pb2_grpc.NpuEmulatorServicer):
    """RPCs this die does not implement yet answer UNIMPLEMENTED (the generated base class)."""

    def __init__(self, die: Die, max_tensor_bytes: int) -> None:
        self.die = die
        self.max_tensor_bytes = max_tensor_bytes

    @map_errors
    async def GetDieInfo(self, request, context):
        ident = self.die.identity
        return npu_pb2.GetDieInfoReply(die_id=ident.die_id, num_dies=ident.num_dies,
                                       hbm_capacity_bytes=ident.hbm_capacity_bytes)

    @map_errors
    async def RunKernel(self, request, context):
        if not request.kernel:
            raise ValueError("kernel: must name a kernel")
        inputs = decode_tensors(request.inputs, max_bytes=self.max_tensor_bytes)
        # Kernels are CPU-bound: run them off the event loop so health checks stay answered.
        result = await asyncio.to_thread(self.die.run_kernel, request.kernel, inputs, dict(request.params))
        return npu_pb2.RunKernelReply(
            outputs=encode_tensors(result.outputs),
            timing=common_pb2.Timing(measured_s=result.measured_s, modeled_s=result.modeled_s),
        )
