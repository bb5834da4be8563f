"""python -m services.gateway: the public entry, OpenAI-compatible HTTP plus gRPC Generate."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from aiohttp import web

from cloudmatrix.model.config import load_config
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.service_main import ServiceParts, run_service
from cmx.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.admission import Admission
from services.gateway.backend import GrpcBackend
from services.gateway.config import GatewayConfig
from services.gateway.core import GatewayCore, ModelInfo
from services.gateway.openai_http import OpenAIHttp
from services.gateway.picker import InstancePicker
from services.gateway.servicer import GatewayServicer

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
log = logging.getLogger(__name__)


def build_core(config: GatewayConfig, backend: GrpcBackend) -> GatewayCore:
    cfg = load_config(config.checkpoint)
    model = ModelInfo(config.model_id or Path(config.checkpoint).resolve().name, cfg.max_position_embeddings,
                      cfg.vocab_size, cfg.eos_token_id, (Path(config.checkpoint) / "train.json").is_file())
    admission = Admission(config.max_in_flight, config.max_queue)
    return GatewayCore(model, TextTokenizer.load(config.checkpoint), backend,
                       InstancePicker("prefill", config.prefill, backend.prefill_load,
                                      on_retire=backend.retire_prefill),
                       InstancePicker("decode", config.decode, backend.decode_load, on_retire=backend.retire_decode),
                       admission, config.request_timeout_s)


def http_port_file(config: GatewayConfig) -> Path:
    """Where the bound HTTP port is written: <run_dir>/ready/<service_name>.http.json."""
    return Path(config.server.run_dir) / "ready" / f"{config.server.service_name or 'gateway'}.http.json"


def _write_port(path: Path, host: str, port: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps({"http_host": host, "http_port": port}))
    tmp.replace(path)


async def build(config: GatewayConfig) -> ServiceParts:
    backend = GrpcBackend(config.server.max_message_bytes)
    core = build_core(config, backend)
    runner = web.AppRunner(OpenAIHttp(core, config.api_keys).app(), handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.server.grace_s)
    port_file = http_port_file(config)

    sites: list[web.TCPSite] = []

    async def on_ready(host) -> None:
        await runner.setup()
        site = web.TCPSite(runner, config.http_host, config.http_port)
        await site.start()
        sites.append(site)
        port = runner.addresses[0][1]
        _write_port(port_file, config.http_host, port)
        log.info("http serving", extra={"http_host": config.http_host, "http_port": port,
                                        "http_port_file": str(port_file)})

    async def on_drain() -> None:
        """SIGTERM: refuse new HTTP connections at once; requests in flight go on streaming."""
        port_file.unlink(missing_ok=True)
        for site in sites:
            await site.stop()
        log.info("http closed to new connections; draining in-flight requests")

    async def on_stop() -> None:
        port_file.unlink(missing_ok=True)
        await runner.cleanup()  # waits up to grace_s for the in-flight handlers
        await backend.close()

    servicer = GatewayServicer(core, config.api_keys)
    return ServiceParts([(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, SERVICE_NAME)], on_ready, on_stop,
                        on_drain)


def main() -> None:
    run_service("gateway", GatewayConfig, build)


if __name__ == "__main__":
    main()
