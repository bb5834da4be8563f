"""python -m services.ub_fabric: the Unified-Bus switch fabric routing dispatch/combine rounds."""
from __future__ import annotations

from prometheus_client import REGISTRY

from cloudmatrix.costmodel.ub import cached_transfer_model
from cloudmatrix.service_main import ServiceParts, run_service
from cmx.fabric.v1 import fabric_pb2
from services.ub_fabric.config import UbFabricConfig
from services.ub_fabric.core import FabricCore
from services.ub_fabric.servicer import LinkCollector, UbFabricServicer, add_to_server

SERVICE_NAME = fabric_pb2.DESCRIPTOR.services_by_name["UbFabric"].full_name


async def build(config: UbFabricConfig) -> ServiceParts:
    core = FabricCore(cached_transfer_model())
    REGISTRY.register(LinkCollector(core))
    servicer = UbFabricServicer(core, config.hello_timeout_s)
    return ServiceParts([(add_to_server, servicer, SERVICE_NAME)])


def main() -> None:
    run_service("ub_fabric", UbFabricConfig, build)


if __name__ == "__main__":
    main()
