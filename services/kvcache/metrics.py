"""Prometheus metrics of a kvcache shard, read from the store's stats at scrape time, so the
exported counters and gauges always agree with the Stats RPC."""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from services.kvcache.store import ShardStore

COUNTERS = {  # exported as cmx_kvcache_<name>_total
    "hits": "Get keys found",
    "misses": "Get keys not found",
    "stored": "Put blocks stored",
    "duplicates": "Put blocks already stored with the same bytes",
    "conflicts": "Put blocks whose key was stored with different bytes",
    "rejected": "Put blocks rejected (invalid, conflicting or no room)",
    "evictions": "Blocks evicted from the memory tier (LRU)",
    "spills": "Blocks written to the disk tier on eviction",
    "promotions": "Blocks read back from the disk tier into memory",
    "checksum_failures": "Blocks and blobs found corrupt on read (dropped, never served)",
}


class ShardCollector(Collector):
    def __init__(self, store: ShardStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        s = self.store.stats()
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"cmx_kvcache_{name}", doc, value=getattr(s, name))
        yield _per_tier("cmx_kvcache_used_bytes", "Block data bytes held, per tier", s.used_bytes, s.disk_bytes)
        yield _per_tier("cmx_kvcache_capacity_bytes", "Capacity in block data bytes, per tier",
                        s.capacity_bytes, s.disk_capacity_bytes)
        yield _per_tier("cmx_kvcache_keys", "Blocks held, per tier", s.blocks, s.disk_blocks)
        yield GaugeMetricFamily("cmx_kvcache_leased_blocks", "Memory blocks pinned by a lease", value=s.leased_blocks)
        yield GaugeMetricFamily("cmx_kvcache_blobs", "Complete blobs held", value=s.blobs)
        yield GaugeMetricFamily("cmx_kvcache_blob_bytes", "Bytes of complete blobs held", value=s.blob_bytes)


def _per_tier(name: str, doc: str, memory: int, disk: int) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, doc, labels=["tier"])
    gauge.add_metric(["memory"], memory)
    gauge.add_metric(["disk"], disk)
    return gauge


def register_metrics(store: ShardStore, registry: CollectorRegistry = REGISTRY) -> ShardCollector:
    """Export ``store``'s stats from ``registry`` (once per process for the default registry)."""
    collector = ShardCollector(store)
    registry.register(collector)
    return collector
