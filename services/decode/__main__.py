"""python -m services.decode: a decode instance, continuous batching over its dies."""
from __future__ import annotations

from cloudmatrix.instance.build import build_loop, kv_namespace, model_id_of, start_loop
from cloudmatrix.instance.pool import open_pool
from cloudmatrix.model.config import load_config
from cloudmatrix.service_main import ServiceParts, run_service
from cmx.decode.v1 import decode_pb2, decode_pb2_grpc
from services.decode.config import DecodeConfig
from services.decode.core import DecodeCore
from services.decode.servicer import DecodeServicer

SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


async def build(config: DecodeConfig) -> ServiceParts:
    cfg = load_config(config.checkpoint)
    pool = await open_pool(config)
    loop = build_loop(config, config.instance_id, config.microbatches, pool)
    core = DecodeCore(loop, pool, cfg.eos_token_id, cfg.vocab_size, cfg.max_position_embeddings, config.chunk_tokens)

    async def on_ready(host) -> None:
        await start_loop(loop, host, config, config.instance_id)

    async def on_stop() -> None:
        await loop.stop()
        await pool.close()
        await loop.driver.close()

    servicer = DecodeServicer(core, config.instance_id, model_id_of(config), kv_namespace(config))
    return ServiceParts([(decode_pb2_grpc.add_DecodeServicer_to_server, servicer, SERVICE_NAME)], on_ready, on_stop)


def main() -> None:
    run_service("decode", DecodeConfig, build)


if __name__ == "__main__":
    main()
