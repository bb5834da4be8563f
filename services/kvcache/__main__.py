"""python -m services.kvcache: one shard of the Elastic Memory Service KV-cache pool."""
from __future__ import annotations

import asyncio
import logging
import shutil

from cloudmatrix.errors import FieldError
from cloudmatrix.service_main import ServiceParts, run_service
from cmx.kvcache.v1 import kvcache_pb2
from services.kvcache.config import KvCacheConfig
from services.kvcache.keeper import PoolKeeper
from services.kvcache.metrics import register_metrics
from services.kvcache.servicer import KvCacheServicer, add_to_server
from services.kvcache.store import ShardStore

SERVICE_NAME = kvcache_pb2.DESCRIPTOR.services_by_name["KvCacheShard"].full_name
WILDCARDS = ("0.0.0.0", "::", "")
DISK_HEADROOM = 0.9  # the disk tier fills at most this share of its volume: eviction before ENOSPC

log = logging.getLogger("services.kvcache")


def check_disk(config: KvCacheConfig) -> None:
    """Refuse a disk tier larger than its volume allows (a 4 GiB tier on a 2 GiB claim fails with
    ENOSPC long before it evicts)."""
    if config.disk_dir is None:
        return
    volume = shutil.disk_usage(config.disk_dir).total
    if config.disk_capacity_bytes > DISK_HEADROOM * volume:
        raise FieldError("disk_capacity_bytes", f"{config.disk_capacity_bytes} bytes is more than "
                         f"{DISK_HEADROOM:.0%} of the {volume}-byte volume holding {config.disk_dir}")


async def build(config: KvCacheConfig) -> ServiceParts:
    store = await asyncio.to_thread(ShardStore.from_config, config)  # indexes the disk tier's files
    check_disk(config)
    register_metrics(store)
    stats = store.stats()
    log.info("kvcache shard opened", extra={"disk_blocks": stats.disk_blocks, "blobs": stats.blobs,
                                            "dropped_damaged_files": stats.checksum_failures})
    servicer = KvCacheServicer(store, name=config.advertise)
    keepers: list[PoolKeeper] = []

    async def on_ready(host) -> None:
        if not servicer.name and config.server.host not in WILDCARDS:
            servicer.name = host.address  # else "": clients name it by the address they reached

        if config.members:
            keepers.append(PoolKeeper(servicer.name or host.address, config.members, replication=config.replication,
                                      interval_s=config.membership_interval_s, leave_after_s=config.leave_after_s))
            keepers[0].start()

    async def on_stop() -> None:
        for keeper in keepers:
            await keeper.close()

    return ServiceParts([(add_to_server, servicer, SERVICE_NAME)], on_ready, on_stop)


def main() -> None:
    run_service("kvcache", KvCacheConfig, build)


if __name__ == "__main__":
    main()
