"""Prefill, free of gRPC: context-cache lookup, the prompt submitted to the instance's scheduler
(the cached prefix fetched from the pool and written to the die when the request is admitted, the
rest computed in chunks packed with other requests'), the new KV read back and written to the
pool, the prompt's blocks leased for the decode, the first token. A request that asks for prompt
log-probabilities (echo) computes its whole prompt: a cached prefix has none.

Timing phases (measured wall seconds here; modeled CloudMatrix384 seconds for cache_load, the
cached blocks' KV read from the pool over UB, and compute): queue, cache_lookup, cache_load,
compute, kv_write.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable

from opentelemetry import trace

from cloudmatrix.costmodel import ub
from cloudmatrix.errors import FieldError
from cloudmatrix.instance.loop import StepLoop
from cloudmatrix.instance.request import KvPrefix, Request
from cloudmatrix.kv.hashing import PrefixKeys, prefix_keys
from cloudmatrix.kv.pooled import leading_blocks
from cloudmatrix.kvcache import Block, Lease, PutResult
from cloudmatrix.rpc.errors import PeerUnavailable
from cloudmatrix.rpc.tensor_codec import encode_tensor
from cloudmatrix.sampling_params import SamplingParams, StopRule, TokenLogprobs

_TRACER = trace.get_tracer(__name__)


@dataclasses.dataclass(frozen=True)
class PrefillResult:
    first_token: int
    keys: PrefixKeys
    cached_tokens: int
    computed_tokens: int
    measured: dict[str, float]
    modeled: dict[str, float]
    lease: Lease | None = None    # pins the prompt's blocks in the pool until the decode adopts them
    logprobs: TokenLogprobs | None = None                # of first_token, when asked for
    prompt_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # of token_ids[1:]
    draft: int | None = None      # with MTP: its guess of the token after first_token, for the decode
    in_pool: bool = True          # the prompt's KV is in the pool (False: the first token, ahead of it)


@dataclasses.dataclass(frozen=True)
class PrefillSettings:
    namespace: str
    block_size: int
    chunk_tokens: int
    vocab_size: int
    context_limit: int
    lease_ttl_s: float = 60.0


@dataclasses.dataclass(frozen=True)
class _Survey:
    present: list[bool]               # per key of the prompt (``PrefixKeys.all``): held by the pool
    lease: Lease | None               # over them, for the decode (None: no decode follows)


@dataclasses.dataclass(frozen=True)
class _Computed:
    first_token: int
    draft: int | None                 # the MTP module's guess of the token after first_token
    kv: list                          # the exported blocks' KV, from block ``cached_blocks`` on
    cached_blocks: int                # blocks of the prefix that came from the pool
    logprobs: TokenLogprobs | None
    prompt_logprobs: list[TokenLogprobs]


class PrefillCore:
    def __init__(self, loop: StepLoop, pool, settings: PrefillSettings) -> None:
        self.loop, self.pool, self.settings = loop, pool, settings
        self.namespace, self.block_size = settings.namespace, settings.block_size
        self.cache_queries = self.cache_hits = 0  # prompt tokens looked up / loaded from the pool

    def validate(self, token_ids: list[int]) -> None:
        s = self.settings
        if not token_ids:
            raise FieldError("token_ids", "the prompt is empty")
        if len(token_ids) >= s.context_limit:
            raise FieldError("token_ids", f"{len(token_ids)} tokens leave no room in the context of {s.context_limit}")
        if any(not 0 <= t < s.vocab_size for t in token_ids):
            raise FieldError("token_ids", f"ids must be in [0, {s.vocab_size})")

    async def prefill(self, request_id: str, token_ids: list[int], sampling: SamplingParams, use_cache: bool,
                      on_computed: Callable[[PrefillResult], Awaitable[None]] | None = None) -> PrefillResult:
        """The prompt computed and its KV in the pool. ``on_computed``, when given, is awaited with
        the first token (a result with no lease and the timing so far) before the KV is written back:
        a caller can show that token while the write-back runs."""
        self.validate(token_ids)
        self.loop.check_admission()  # refuse before any pool traffic
        use_cache = use_cache and sampling.prompt_logprobs is None  # a cached prefix has no logprobs
        measured, modeled = {}, {"compute": 0.0, "cache_load": 0.0}
        keys = prefix_keys(token_ids, self.block_size, self.namespace)
        ids = {"request_id": request_id, "prompt_tokens": len(token_ids)}
        # max_tokens 1: the first token ends the request, no decode reads the blocks: no lease
        lease_for_decode = sampling.max_tokens > 1
        with _TRACER.start_as_current_span("prefill.cache", attributes=ids) as span:
            survey = await self._survey(keys, lease_for_decode, measured)
            hit = self._hit(keys, survey.present) if use_cache else 0
            span.set_attribute("cached_tokens", hit * self.block_size)
        try:
            with _TRACER.start_as_current_span("prefill.compute", attributes=ids):
                out = await self._compute(request_id, token_ids, sampling, keys, hit, measured, modeled)
            modeled["total"] = modeled["compute"] + modeled["cache_load"]
            if on_computed is not None and out.first_token is not None:
                ahead = self._result(keys, out, None, dict(measured), dict(modeled))
                await on_computed(dataclasses.replace(ahead, in_pool=False))
            with _TRACER.start_as_current_span("prefill.kv_write", attributes=ids):
                lease = await self._write_back(keys, out.cached_blocks, out.kv, survey, measured)
        except BaseException:  # failed or cancelled: no decode will read the blocks
            if survey.lease is not None:
                await self.pool.release(survey.lease)
            raise
        if use_cache and self.pool:
            self.cache_queries += len(token_ids)
            self.cache_hits += out.cached_blocks * self.block_size
        return self._result(keys, out, lease, measured, modeled)

    def _result(self, keys: PrefixKeys, out: _Computed, lease: Lease | None, measured, modeled) -> PrefillResult:
        cached_tokens = out.cached_blocks * self.block_size
        return PrefillResult(out.first_token, keys, cached_tokens, keys.num_tokens - cached_tokens, measured, modeled,
                             lease, out.logprobs, out.prompt_logprobs, out.draft)

    async def _survey(self, keys: PrefixKeys, lease_for_decode: bool, measured) -> _Survey:
        """Which of the prompt's blocks the pool holds, in one Lookup per shard; for a decode to
        come, that Lookup also leases them, so none is evicted before the decode has read it, and
        the blocks written back join the lease."""
        start = time.perf_counter()
        survey = _Survey([False] * len(keys.all), None)
        if self.pool and lease_for_decode:
            survey = _Survey(*await self.pool.lookup_and_lease(list(keys.all), self.settings.lease_ttl_s))
        elif self.pool:
            survey = _Survey(await self.pool.presence(list(keys.all)), None)
        measured["cache_lookup"] = time.perf_counter() - start
        return survey

    def _hit(self, keys: PrefixKeys, present: list[bool]) -> int:
        """Blocks of the longest cached prefix; at least one token is left to compute (its logits
        give the first token)."""
        limit = min(len(keys.full), (keys.num_tokens - 1) // self.block_size)
        return next((i for i in range(limit) if not present[i]), limit)

    def _fetcher(self, keys: PrefixKeys, hit: int, measured, modeled):
        """The cached prefix's KV as the scheduler admits the request ([layers, block, C+R] per
        block): the leading run of the ``hit`` blocks still in the pool (one evicted since the
        lookup ends it). Modeled: those bytes over UB."""
        async def fetch() -> list:
            start = time.perf_counter()
            blocks = await leading_blocks(self.pool, list(keys.full[:hit]))
            measured["cache_load"] = time.perf_counter() - start
            modeled["cache_load"] = ub.pool_transfer_s(sum(b.numel() * b.element_size() for b in blocks))
            return blocks

        return fetch

    async def _compute(self, request_id, token_ids, sampling, keys: PrefixKeys, hit: int, measured,
                       modeled) -> _Computed:
        """The prompt through the scheduler: the cached prefix is fetched and written to the die
        on admission, the rest computed in chunks; returns the first token and the new blocks' KV."""
        start, queued = time.perf_counter(), 0.0
        prefix = KvPrefix(hit * self.block_size, self._fetcher(keys, hit, measured, modeled)) if hit else None
        request = Request(request_id, list(token_ids), sampling, StopRule(max_new_tokens=1), prefix=prefix,
                          chunk_tokens=self.settings.chunk_tokens, export_from_block=hit if self.pool else None)
        prompt_logprobs: dict[int, TokenLogprobs] = {}  # by position (a preempted request recomputes)
        events = self.loop.submit(request)
        try:
            async for event in events:
                queued += event.queued_s
                modeled["compute"] += event.step_modeled_s
                prompt_logprobs.update(enumerate(event.prompt_logprobs, event.prompt_start))
        finally:
            if not request.finished:  # the caller left (cancelled, deadline): end it between steps
                self.loop.abort(request_id)
        measured["queue"], measured["compute"] = queued, time.perf_counter() - start - queued
        cached = request.export_from_block if request.export_from_block is not None else hit
        measured.setdefault("cache_load", 0.0)
        first = event.token_ids[0] if event.token_ids else None  # none when it was aborted
        return _Computed(first, event.draft, event.kv or [], cached, event.logprobs[0] if event.logprobs else None,
                         [prompt_logprobs[i] for i in sorted(prompt_logprobs)])

    async def _write_back(self, keys: PrefixKeys, cached_blocks: int, kvs: list, survey: _Survey,
                          measured) -> Lease | None:
        """Store the newly computed blocks (full ones and the tail) the pool did not hold at the
        survey; they join its lease, which then covers every block of the prompt.

        A block's KV computed along another path (another chunking, another batch) differs in its
        last bits, so a key already stored - or stored meanwhile by a concurrent prefill of the same
        prefix, which the shard answers with CONFLICT - keeps its first version: both are the KV of
        that prefix. A block stored where the survey left no lease (a stand-in for a shard that
        went down, a lease that expired) has the whole prompt leased again, the survey's released."""
        start = time.perf_counter()
        lease = survey.lease
        if self.pool:
            new = [(i, k, kv) for i, (k, kv) in enumerate(zip(keys.all[cached_blocks:], kvs), cached_blocks)
                   if not survey.present[i]]
            blocks = [Block(k, self.namespace, "tail" if k == keys.tail else "full", kv.shape[1],
                            encode_tensor(kv).SerializeToString()) for _, k, kv in new]
            results = await self.pool.put_blocks(blocks, lease)
            failed = [r for r in results if not r.acknowledged and not r.only_conflicts]
            if failed:
                raise PeerUnavailable(f"kvcache: {len(failed)} of {len(blocks)} blocks were not acknowledged "
                                      f"({next(iter(failed[0].errors.values()), 'no replica')})")
            if lease is not None:
                lease = await self._cover(keys, lease, [(i, r) for (i, _, _), r in zip(new, results)])
        measured["kv_write"] = time.perf_counter() - start
        return lease

    async def _cover(self, keys: PrefixKeys, lease: Lease, written: list[tuple[int, PutResult]]) -> Lease:
        """The survey's lease with the written blocks that joined it; a fresh lease over the whole
        prompt when one was stored on a shard where it did not join."""
        if any(set(r.stored_on) - set(r.leased_on) for _, r in written):
            fresh = await self.pool.lease(list(keys.all), self.settings.lease_ttl_s)
            await self.pool.release(lease)
            return fresh
        leased = list(lease.leased)
        for i, r in written:
            leased[i] = leased[i] or bool(r.leased_on)
        return dataclasses.replace(lease, leased=tuple(leased))

