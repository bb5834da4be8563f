"""LoadModel: build a die's engine from a checkpoint, a precision, a placement and a fabric."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

from cloudmatrix.errors import FieldError
from cloudmatrix.fabric.link import FabricLink
from cloudmatrix.kv.block_pool import PagedLatentPool
from cloudmatrix.kvcache.client import KvPoolClient
from cloudmatrix.model.config import load_config
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.model_cache import CacheReport, load_units, units_for
from cloudmatrix.moe.die_model import (
    build_die_model,
    default_dispatch_dtype,
    die_expert_filter,
    needs_in_memory_quantization,
)
from cloudmatrix.moe.local_exchange import SingleDieExchange
from cloudmatrix.moe.placement import ExpertPlacement
from cloudmatrix.rpc.errors import ResourceExhausted
from services.npu_emulator.engine import DieEngine, pool_shape

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    checkpoint: str
    precision: str
    die_id: int
    num_dies: int
    placement: dict[tuple[int, int], tuple[int, ...]]  # (layer, expert) -> dies; empty = round-robin
    block_size: int
    pool_bytes: int
    fabric_address: str
    fabric_group: str
    dispatch_dtype: str
    cache_shards: tuple[str, ...] = ()   # kvcache shards holding the model cache; () = read the disk
    cache_prefix: str = ""
    speculative_tokens: int = 0          # 1: the MTP module too (one draft token per step)

def _placement(spec: LoadSpec) -> ExpertPlacement:
    cfg = load_config(spec.checkpoint)
    layers = cfg.moe_layers(mtp=bool(spec.speculative_tokens))
    default = ExpertPlacement.round_robin(layers, cfg.n_routed_experts, spec.num_dies)
    if not spec.placement:
        return default
    replicas = {layer: list(experts) for layer, experts in default.replicas.items()}
    for (layer, expert), dies in spec.placement.items():
        if layer not in replicas or not 0 <= expert < cfg.n_routed_experts:
            raise FieldError("placement", f"layer {layer} expert {expert} is not a routed expert of the model")
        replicas[layer][expert] = dies
    return ExpertPlacement(spec.num_dies, cfg.n_routed_experts, {k: tuple(v) for k, v in replicas.items()})


def _exchange(spec: LoadSpec, round_timeout_s: float, connect_timeout_s: float, max_message_bytes: int):
    if not spec.fabric_address:
        if spec.num_dies != 1:
            raise FieldError("fabric_address", f"needed for {spec.num_dies} dies (expert parallelism)")
        return SingleDieExchange()
    link = FabricLink(spec.fabric_address, spec.die_id, spec.num_dies, spec.fabric_group or "default",
                      round_timeout_s, max_message_bytes)
    log.info("joining the fabric group", extra={"fabric": spec.fabric_address, "group": spec.fabric_group,
                                                "die_id": spec.die_id, "num_dies": spec.num_dies})
    link.connect(connect_timeout_s, wait_for_fabric=True)
    log.info("joined the fabric group", extra={"group": spec.fabric_group})
    return link


def load_engine(spec: LoadSpec, hbm_bytes: int, round_timeout_s: float, connect_timeout_s: float,
                max_message_bytes: int) -> tuple[DieEngine, float]:
    """Returns the engine, the load's wall seconds and whether every weight came from the model
    cache. Blocks until the fabric group assembles."""
    start = time.perf_counter()
    if not 0 <= spec.die_id < spec.num_dies:
        raise FieldError("die_id", f"{spec.die_id} must be in [0, num_dies={spec.num_dies})")
    if spec.speculative_tokens not in (0, 1):
        raise FieldError("speculative_tokens", f"must be 0 or 1 (one MTP draft token), got {spec.speculative_tokens}")
    if spec.speculative_tokens and not load_config(spec.checkpoint).num_nextn_predict_layers:
        raise FieldError("speculative_tokens", f"{spec.checkpoint} has no MTP module (num_nextn_predict_layers 0)")
    precision = parse_precision(spec.precision)
    placement = _placement(spec)
    exchange = _exchange(spec, round_timeout_s, connect_timeout_s, max_message_bytes)
    state, report = _cached_state(spec, precision, placement) if spec.cache_shards else (None, None)
    model = build_die_model(spec.checkpoint, precision, placement, exchange,
                            spec.dispatch_dtype or default_dispatch_dtype(precision), state,
                            mtp=bool(spec.speculative_tokens))
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes + spec.pool_bytes > hbm_bytes:
        raise ResourceExhausted(f"HBM: weights {weight_bytes} B + KV pool {spec.pool_bytes} B exceed {hbm_bytes} B")
    pool = PagedLatentPool(pool_shape(model, spec.block_size, spec.pool_bytes))
    engine = DieEngine(model, pool, exchange, weight_bytes, spec.precision)
    return engine, time.perf_counter() - start, report is not None and report.fully_cached


def _cached_state(spec: LoadSpec, precision, placement: ExpertPlacement):
    """This die's weights through the model cache (the first loader publishes them)."""
    if needs_in_memory_quantization(spec.checkpoint, precision):
        raise FieldError("model_cache", "serving a float checkpoint in INT8 quantizes it in memory; "
                         "quantize it first (cmx quantize) to load it from the model cache")
    cfg = load_config(spec.checkpoint)
    units = units_for(die_expert_filter(placement, spec.die_id), cfg, mtp=bool(spec.speculative_tokens))
    report = CacheReport()

    async def fetch():
        async with KvPoolClient(list(spec.cache_shards), replication=min(2, len(spec.cache_shards))) as client:
            return await load_units(client, spec.cache_prefix or _default_prefix(spec.checkpoint), spec.checkpoint,
                                    units, report, mtp=bool(spec.speculative_tokens))

    return asyncio.run(fetch()), report


def _default_prefix(checkpoint: str) -> str:
    return f"models/{Path(checkpoint).resolve().name}"
