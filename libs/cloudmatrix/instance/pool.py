"""The instance's client of the kvcache pool, from its settings: a fixed list of shards as given,
or the shards found at dynamic sources (dns:, ready:; rpc/discovery.py) and followed while the
instance runs (kvcache/membership.py): a shard that joins is used from the next refresh, one that
left is dropped. With a membership the pool's keeper (one shard) moves blocks, not the instance;
with a fixed list each instance repairs a shard that comes back, as no keeper is assumed."""
from __future__ import annotations

from cloudmatrix.instance.settings import InstanceSettings
from cloudmatrix.kvcache import KvPoolClient
from cloudmatrix.kvcache.membership import Membership
from cloudmatrix.rpc.discovery import dynamic

START_TIMEOUT_S = 90.0  # an instance waits this long for a first shard, before it listens; then it
                        # exits naming the source (in Kubernetes, within the startup probe's 120 s)


async def open_pool(settings: InstanceSettings) -> KvPoolClient | None:
    if not settings.kvcache:
        return None
    if not dynamic(settings.kvcache):
        shards = list(settings.kvcache)
        return KvPoolClient(shards, replication=min(settings.replication, len(shards)))
    membership = Membership(settings.kvcache, leave_after_s=settings.pool_leave_after_s)
    names = await membership.wait_for_members(START_TIMEOUT_S, settings.pool_refresh_s)
    pool = KvPoolClient(names, replication=settings.replication, elastic=True, repair_on_rejoin=False)
    pool.follow(membership, settings.pool_refresh_s)
    return pool
