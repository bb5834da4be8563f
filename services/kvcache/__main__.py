"""python -m services.kvcache: one shard of the Elastic Memory Service KV-cache pool."""
from __future__ import annotations

import asyncio
import logging

from cloudmatrix.service_main import ServiceParts, run_service
from cmx.kvcache.v1 import kvcache_pb2
from services.kvcache.config import KvCacheConfig
from services.kvcache.metrics import register_metrics
from services.kvcache.servicer import KvCacheServicer, add_to_server
from services.kvcache.store import ShardStore

SERVICE_NAME = kvcache_pb2.DESCRIPTOR.services_by_name["KvCacheShard"].full_name

log = logging.getLogger("services.kvcache")


async def build(config: KvCacheConfig) -> ServiceParts:
    store = await asyncio.to_thread(ShardStore.from_config, config)  # indexes the disk tier's files
    register_metrics(store)
    stats = store.stats()
    log.info("kvcache shard opened", extra={"disk_blocks": stats.disk_blocks, "blobs": stats.blobs,
                                            "dropped_damaged_files": stats.checksum_failures})
    servicer = KvCacheServicer(store)
    return ServiceParts([(add_to_server, servicer, SERVICE_NAME)])


def main() -> None:
    run_service("kvcache", KvCacheConfig, build)


if __name__ == "__main__":
    main()
