"""python -m services.prefill: a prefill instance driving its dies, with context caching."""
from __future__ import annotations

from pathlib import Path

from cloudmatrix.instance.batcher import StepBatcher
from cloudmatrix.instance.driver import InstanceDriver
from cloudmatrix.instance.metrics import register_scheduler_metrics
from cloudmatrix.kv.hashing import namespace
from cloudmatrix.kvcache import KvPoolClient
from cloudmatrix.model.config import load_config
from cloudmatrix.service_main import ServiceParts, run_service
from cmx.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from services.prefill.config import PrefillConfig
from services.prefill.core import PrefillCore
from services.prefill.servicer import PrefillServicer

SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


async def build(config: PrefillConfig) -> ServiceParts:
    cfg = load_config(config.checkpoint)
    model_id = config.model_id or Path(config.checkpoint).resolve().name
    driver = InstanceDriver(list(config.dies), config.fabric, group=config.instance_id, timeout_s=config.rpc_timeout_s)
    batcher = StepBatcher(driver, config.max_step_tokens)
    pool = KvPoolClient(list(config.kvcache), replication=min(config.replication, len(config.kvcache))) \
        if config.kvcache else None
    ns = namespace(model_id, "float32", config.block_size)
    core = PrefillCore(driver, batcher, pool, ns, config.block_size, config.chunk_tokens, cfg.vocab_size,
                       cfg.max_position_embeddings)

    async def on_ready(host) -> None:  # the dies load before the instance reports SERVING
        loaded = await driver.load(str(Path(config.checkpoint).resolve()), config.precision,
                                   block_size=config.block_size)
        total = sum(r.kv_blocks_total for r in loaded)
        batcher.on_step = register_scheduler_metrics(config.instance_id, lambda: {
            "num_requests_running": core.running, "num_requests_waiting": 0,
            "kv_cache_usage_ratio": sum(len(s.blocks) for s in driver.sequences.values()) / max(total, 1),
            "prefix_cache_queries": core.cache_queries, "prefix_cache_hits": core.cache_hits})
        batcher.start()

    async def on_stop() -> None:
        await batcher.stop()
        if pool is not None:
            await pool.close()
        await driver.close()

    servicer = PrefillServicer(core, config.instance_id, model_id)
    return ServiceParts([(prefill_pb2_grpc.add_PrefillServicer_to_server, servicer, SERVICE_NAME)], on_ready, on_stop)


def main() -> None:
    run_service("prefill", PrefillConfig, build)


if __name__ == "__main__":
    main()
