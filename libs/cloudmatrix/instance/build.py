"""What the prefill and decode services build alike from their settings: the driver, the step
loop with its scheduler, the KV namespace, the metrics and the health hook."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cloudmatrix.instance.driver import InstanceDriver
from cloudmatrix.instance.loop import InstanceUnavailable, StepLoop
from cloudmatrix.instance.metrics import register_scheduler_metrics
from cloudmatrix.instance.settings import InstanceSettings
from cloudmatrix.kv.hashing import namespace
from cloudmatrix.kvcache import KvPoolClient
from cmx.common.v1 import common_pb2

log = logging.getLogger(__name__)


def model_id_of(settings: InstanceSettings) -> str:
    return settings.model_id or Path(settings.checkpoint).resolve().name


def kv_namespace(settings: InstanceSettings) -> str:
    """The pool namespace of this instance's blocks (KV is stored as float32 in every precision)."""
    return namespace(model_id_of(settings), "float32", settings.block_size, settings.precision,
                     mtp=bool(settings.speculative))


def build_loop(settings: InstanceSettings, instance_id: str, microbatches: int = 1,
               pool: KvPoolClient | None = None) -> StepLoop:
    """The step loop over the instance's dies; with ``settings.model_cache`` the dies load the
    weights through ``pool``'s shards."""
    driver = InstanceDriver(list(settings.dies), settings.fabric, group=instance_id, timeout_s=settings.rpc_timeout_s)

    async def load():
        blocks = await driver.load(str(Path(settings.checkpoint).resolve()), settings.precision,
                                   block_size=settings.block_size, max_blocks=settings.kv_blocks_per_die,
                                   model_cache=pool.ring.shards if settings.model_cache and pool else None,
                                   speculative_tokens=settings.speculative)
        log.info("dies loaded", extra={"instance": instance_id, "dies": len(driver.loaded),
                                       "from_model_cache": sum(m.from_model_cache for m in driver.loaded)})
        return blocks

    return StepLoop(driver, load, settings.scheduler_limits(), settings.loop_settings(instance_id, microbatches))


async def start_loop(loop: StepLoop, host, settings: InstanceSettings, instance_id: str,
                     extra: Callable[[], dict[str, float]] = dict) -> None:
    """Load the dies and start stepping; the service's health follows the loop's from then on,
    and the scheduler's gauges and step histograms are registered (labels: the model's name and
    the instance id as ``engine``)."""
    loop.on_health = host.set_health
    await loop.start()
    loop.on_step = register_scheduler_metrics(model_id_of(settings), instance_id,
                                              lambda: {**scheduler_gauges(loop), **extra()})


def scheduler_gauges(loop: StepLoop) -> dict[str, float]:
    s = loop.scheduler
    values = {"num_requests_running": len(s.running), "num_requests_waiting": len(s.waiting),
              "kv_cache_usage_ratio": s.blocks.usage, "num_preemptions": s.preemptions}
    if s.limits.speculative_tokens:  # one draft position: a draft is one draft token
        values |= {"spec_decode_num_drafts": s.speculation.drafts, "spec_decode_num_draft_tokens": s.speculation.drafts,
                   "spec_decode_num_accepted_tokens": s.speculation.accepted}
    return values


def instance_load(loop: StepLoop, instance_id: str) -> common_pb2.InstanceLoad:
    """The instance's load for the gateway's picker; InstanceUnavailable while it is not serving,
    so that pickers skip it."""
    if not loop.serving:
        raise InstanceUnavailable(f"{instance_id} is {loop.state.value}: {loop.why}")
    s, (measured, modeled) = loop.scheduler, loop.recent
    blocks = s.blocks
    return common_pb2.InstanceLoad(
        instance_id=instance_id, running_requests=len(s.running), waiting_requests=len(s.waiting),
        waiting_tokens=sum(len(r.token_ids) - r.num_computed for r in s.waiting),
        kv_blocks_used=blocks.used, kv_blocks_total=sum(blocks.total), recent_step_measured_s=measured,
        recent_step_modeled_s=modeled, die_kv_blocks_free=blocks.free_per_die, preemptions=s.preemptions)
