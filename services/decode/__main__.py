"""python -m services.decode: a decode instance, continuous batching over its dies."""
from __future__ import annotations

from pathlib import Path

from cloudmatrix.instance.batcher import StepBatcher
from cloudmatrix.instance.driver import InstanceDriver
from cloudmatrix.instance.metrics import register_scheduler_metrics
from cloudmatrix.kv.hashing import namespace
from cloudmatrix.kvcache import KvPoolClient
from cloudmatrix.model.config import load_config
from cloudmatrix.service_main import ServiceParts, run_service
from cmx.decode.v1 import decode_pb2, decode_pb2_grpc
from services.decode.config import DecodeConfig
from services.decode.core import DecodeCore
from services.decode.servicer import DecodeServicer

SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


async def build(config: DecodeConfig) -> ServiceParts:
    cfg = load_config(config.checkpoint)
    model_id = config.model_id or Path(config.checkpoint).resolve().name
    driver = InstanceDriver(list(config.dies), config.fabric, group=config.instance_id, timeout_s=config.rpc_timeout_s)
    batcher = StepBatcher(driver, max_step_tokens=config.max_running, microbatches=config.microbatches)
    pool = KvPoolClient(list(config.kvcache), replication=min(config.replication, len(config.kvcache)))
    core = DecodeCore(driver, batcher, pool, cfg.eos_token_id, cfg.max_position_embeddings, config.max_running,
                      config.max_waiting)

    async def on_ready(host) -> None:
        loaded = await driver.load(str(Path(config.checkpoint).resolve()), config.precision,
                                   block_size=config.block_size)
        total = sum(r.kv_blocks_total for r in loaded)
        batcher.on_step = register_scheduler_metrics(config.instance_id, lambda: {
            "num_requests_running": core.running, "num_requests_waiting": core.waiting,
            "kv_cache_usage_ratio": sum(len(s.blocks) for s in driver.sequences.values()) / max(total, 1)})
        batcher.start()

    async def on_stop() -> None:
        await batcher.stop()
        await pool.close()
        await driver.close()

    servicer = DecodeServicer(core, config.instance_id, model_id, namespace(model_id, "float32", config.block_size))
    return ServiceParts([(decode_pb2_grpc.add_DecodeServicer_to_server, servicer, SERVICE_NAME)], on_ready, on_stop)


def main() -> None:
    run_service("decode", DecodeConfig, build)


if __name__ == "__main__":
    main()
