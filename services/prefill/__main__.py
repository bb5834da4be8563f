"""python -m services.prefill: a prefill instance driving its dies, with context caching."""
from __future__ import annotations

from cloudmatrix.instance.build import build_loop, kv_namespace, model_id_of, start_loop
from cloudmatrix.instance.pool import open_pool
from cloudmatrix.model.config import load_config
from cloudmatrix.service_main import ServiceParts, run_service
from cmx.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from services.prefill.config import PrefillConfig
from services.prefill.core import PrefillCore, PrefillSettings
from services.prefill.servicer import PrefillServicer

SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


async def build(config: PrefillConfig) -> ServiceParts:
    cfg = load_config(config.checkpoint)
    pool = await open_pool(config)
    loop = build_loop(config, config.instance_id, pool=pool)
    core = PrefillCore(loop, pool, PrefillSettings(kv_namespace(config), config.block_size, config.chunk_tokens,
                                                   cfg.vocab_size, cfg.max_position_embeddings,
                                                   config.kv_lease_ttl_s))

    async def on_ready(host) -> None:  # the dies load before the instance reports SERVING
        await start_loop(loop, host, config, config.instance_id, lambda: {
            "prefix_cache_queries": core.cache_queries, "prefix_cache_hits": core.cache_hits})

    async def on_stop() -> None:
        await loop.stop()
        if pool is not None:
            await pool.close()
        await loop.driver.close()

    servicer = PrefillServicer(core, config.instance_id, model_id_of(config))
    return ServiceParts([(prefill_pb2_grpc.add_PrefillServicer_to_server, servicer, SERVICE_NAME)], on_ready, on_stop)


def main() -> None:
    run_service("prefill", PrefillConfig, build)


if __name__ == "__main__":
    main()
