"""Prefill, free of gRPC: context-cache lookup, cache load into the dies, chunked prefill packed
with other requests' chunks, KV write-back to the pool, first token.

Timing phases (measured wall seconds here; modeled CloudMatrix384 seconds for compute):
queue, cache_lookup, cache_load, compute, kv_write.
"""
from __future__ import annotations

import dataclasses
import time

from opentelemetry import trace

from cloudmatrix.instance.batcher import StepBatcher
from cloudmatrix.instance.driver import InstanceDriver, StepInput
from cloudmatrix.kv.hashing import PrefixKeys, prefix_keys
from cloudmatrix.kvcache import Block
from cloudmatrix.model.sampling import SamplingParams
from cloudmatrix.rpc.errors import PeerUnavailable
from cloudmatrix.rpc.tensor_codec import decode_tensor, encode_tensor
from cmx.common.v1 import common_pb2

_TRACER = trace.get_tracer(__name__)


@dataclasses.dataclass(frozen=True)
class PrefillResult:
    first_token: int
    keys: PrefixKeys
    cached_tokens: int
    computed_tokens: int
    measured: dict[str, float]
    modeled: dict[str, float]


class PrefillCore:
    def __init__(self, driver: InstanceDriver, batcher: StepBatcher, pool, namespace: str, block_size: int,
                 chunk_tokens: int, vocab_size: int, context_limit: int) -> None:
        self.driver, self.batcher, self.pool = driver, batcher, pool
        self.namespace, self.block_size, self.chunk_tokens = namespace, block_size, chunk_tokens
        self.vocab_size, self.context_limit = vocab_size, context_limit
        self.running = 0
        self.cache_queries = self.cache_hits = 0  # prompt tokens looked up / loaded from the pool

    def validate(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("token_ids: the prompt is empty")
        if len(token_ids) >= self.context_limit:
            raise ValueError(f"token_ids: {len(token_ids)} tokens leave no room in the context of {self.context_limit}")
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"token_ids: ids must be in [0, {self.vocab_size})")

    async def prefill(self, request_id: str, token_ids: list[int], sampling: SamplingParams,
                      use_cache: bool) -> PrefillResult:
        self.validate(token_ids)
        self.running += 1
        measured, modeled = {}, {"compute": 0.0}
        try:
            keys = prefix_keys(token_ids, self.block_size, self.namespace)
            ids = {"request_id": request_id, "prompt_tokens": len(token_ids)}
            with _TRACER.start_as_current_span("prefill.cache", attributes=ids) as span:
                cached_blocks = await self._load_cached(request_id, keys, len(token_ids), use_cache, measured)
                span.set_attribute("cached_tokens", cached_blocks * self.block_size)
            with _TRACER.start_as_current_span("prefill.compute", attributes=ids):
                first = await self._compute(request_id, token_ids, cached_blocks * self.block_size, sampling,
                                            measured, modeled)
            with _TRACER.start_as_current_span("prefill.kv_write", attributes=ids):
                await self._write_back(request_id, keys, cached_blocks, measured)
        finally:
            self.running -= 1
            if request_id in self.driver.sequences:
                await self.driver.release(request_id)
        cached = cached_blocks * self.block_size
        if use_cache and self.pool:
            self.cache_queries += len(token_ids)
            self.cache_hits += cached
        modeled["total"] = modeled["compute"]
        return PrefillResult(first, keys, cached, len(token_ids) - cached, measured, modeled)

    async def _load_cached(self, request_id, keys: PrefixKeys, num_tokens: int, use_cache: bool, measured) -> int:
        """Longest cached prefix, loaded into the sequence's die; at least one token is left to
        compute (its logits give the first token)."""
        start = time.perf_counter()
        limit = min(len(keys.full), (num_tokens - 1) // self.block_size)
        hit = await self.pool.lookup(list(keys.full[:limit])) if self.pool and use_cache and limit else 0
        measured["cache_lookup"] = time.perf_counter() - start
        start = time.perf_counter()
        blocks = []
        if hit:
            fetched = await self.pool.get_blocks(list(keys.full[:hit]))
            for key in keys.full[:hit]:  # a block evicted since the lookup ends the usable prefix
                if fetched.get(key) is None:
                    break
                blocks.append(decode_tensor(common_pb2.Tensor.FromString(fetched[key].data), "kv"))
            await self.driver.adopt(request_id, blocks)
        measured["cache_load"] = time.perf_counter() - start
        return len(blocks)

    async def _compute(self, request_id, token_ids, cached: int, sampling, measured, modeled) -> int:
        start, queued, outcome = time.perf_counter(), 0.0, None
        for begin in range(cached, len(token_ids), self.chunk_tokens):
            chunk = token_ids[begin:begin + self.chunk_tokens]
            last = begin + len(chunk) == len(token_ids)
            outcome = await self.batcher.submit(StepInput(request_id, chunk, sampling, skip_sampling=not last))
            queued += outcome.queued_s
            modeled["compute"] += outcome.step_modeled_s
        measured["queue"], measured["compute"] = queued, time.perf_counter() - start - queued
        return outcome.output.token_id

    async def _write_back(self, request_id, keys: PrefixKeys, cached_blocks: int, measured) -> None:
        """Store the newly computed blocks (full ones and the tail) the pool does not hold yet.

        A block's KV computed along another path (another chunking, another batch) differs in its
        last bits, so a key already stored - or stored meanwhile by a concurrent prefill of the same
        prefix, which the shard answers with CONFLICT - keeps its first version: both are the KV of
        that prefix."""
        start = time.perf_counter()
        if self.pool:
            kvs = await self.driver.export(request_id, cached_blocks)
            new_keys = list(keys.all[cached_blocks:])
            present = await self.pool.presence(new_keys)
            blocks = [Block(k, self.namespace, "tail" if k == keys.tail else "full", kv.shape[1],
                            encode_tensor(kv).SerializeToString())
                      for k, kv, there in zip(new_keys, kvs, present) if not there]
            results = await self.pool.put_blocks(blocks)
            failed = [r for r in results if not r.acknowledged and not _only_conflicts(r)]
            if failed:
                raise PeerUnavailable(f"kvcache: {len(failed)} of {len(blocks)} blocks were not acknowledged "
                                      f"({next(iter(failed[0].errors.values()), 'no replica')})")
        measured["kv_write"] = time.perf_counter() - start


def _only_conflicts(result) -> bool:
    return bool(result.errors) and all("CONFLICT" in e for e in result.errors.values())
