"""python -m services.npu_emulator: one emulated Ascend 910C die as a gRPC server."""
from __future__ import annotations

import torch
from prometheus_client import REGISTRY

from cloudmatrix.service_main import ServiceParts, run_service
from cmx.npu.v1 import npu_pb2, npu_pb2_grpc
from services.npu_emulator.config import NpuEmulatorConfig
from services.npu_emulator.core import Die, DieIdentity
from services.npu_emulator.metrics import DieCollector, DieCounters
from services.npu_emulator.servicer import NpuEmulatorServicer

SERVICE_NAME = npu_pb2.DESCRIPTOR.services_by_name["NpuEmulator"].full_name


async def build(config: NpuEmulatorConfig) -> ServiceParts:
    torch.set_num_threads(config.threads)
    die = Die(DieIdentity(config.die_id, config.num_dies, config.hbm_bytes))
    counters = DieCounters()
    REGISTRY.register(DieCollector(die, counters))
    servicer = NpuEmulatorServicer(die, config, counters)
    return ServiceParts([(npu_pb2_grpc.add_NpuEmulatorServicer_to_server, servicer, SERVICE_NAME)])


def main() -> None:
    run_service("npu_emulator", NpuEmulatorConfig, build)


if __name__ == "__main__":
    main()
