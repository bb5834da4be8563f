"""python -m services.ub_fabric: the Unified-Bus switch fabric routing dispatch/combine frames."""
from __future__ import annotations

from cloudmatrix.costmodel.ub import transfer_s
from cloudmatrix.service_main import ServiceParts, run_service
from cmx.fabric.v1 import fabric_pb2, fabric_pb2_grpc
from services.ub_fabric.config import UbFabricConfig
from services.ub_fabric.core import FabricCore
from services.ub_fabric.servicer import UbFabricServicer

SERVICE_NAME = fabric_pb2.DESCRIPTOR.services_by_name["UbFabric"].full_name


async def build(config: UbFabricConfig) -> ServiceParts:
    servicer = UbFabricServicer(FabricCore(transfer_s), config.hello_timeout_s)
    return ServiceParts([(fabric_pb2_grpc.add_UbFabricServicer_to_server, servicer, SERVICE_NAME)])


def main() -> None:
    run_service("ub_fabric", UbFabricConfig, build)


if __name__ == "__main__":
    main()
