"""Decode, free of gRPC: hand a request with its KV handle to the instance's scheduler, which
admits it when its blocks fit (only then are the prompt's blocks pulled from the pool, and the
prefill's lease on them released), steps it with every other running request (continuous
batching), preempts it when the dies run out of blocks (it fetches the prompt's blocks again when
readmitted, recomputing what the pool no longer holds), and ends it at EOS, max_tokens, a stop
token or the context limit. Cancels and disconnects end it between steps.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from opentelemetry import trace

from cloudmatrix.errors import FieldError
from cloudmatrix.instance.loop import StepLoop
from cloudmatrix.instance.request import KvPrefix, Request
from cloudmatrix.kv.pooled import leading_blocks
from cloudmatrix.kvcache import Lease
from cloudmatrix.sampling_params import FinishReason, SamplingParams, StopRule, TokenLogprobs

_TRACER = trace.get_tracer(__name__)


@dataclasses.dataclass(frozen=True)
class DecodeRequest:
    request_id: str
    prompt_token_ids: list[int]
    first_token: int
    block_keys: list[bytes]
    sampling: SamplingParams        # its stop_token_ids and ignore_eos apply here; stop strings at the gateway
    lease: Lease | None = None      # the prefill's lease on the blocks; released once they are read
    draft: int | None = None        # the prefill's MTP draft of the token after first_token

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclasses.dataclass(frozen=True)
class DecodeEvent:
    """Tokens produced by one step (or the finish), with measured / modeled seconds."""

    token_ids: list[int]
    finish_reason: FinishReason | None
    measured: dict[str, float]
    modeled: dict[str, float]
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # of the tokens, when asked for


class DecodeCore:
    def __init__(self, loop: StepLoop, pool, eos: int, vocab_size: int, context_limit: int,
                 chunk_tokens: int = 256) -> None:
        self.loop, self.pool = loop, pool
        self.eos, self.vocab_size, self.context_limit, self.chunk_tokens = eos, vocab_size, context_limit, chunk_tokens

    def cancel(self, request_id: str) -> bool:
        """End a request before the next step (finish reason CANCELLED); False if it is unknown."""
        return self.loop.abort(request_id, FinishReason.CANCELLED)

    def validate(self, req: DecodeRequest) -> None:
        """Bad input fails this request alone, here, before anything reaches a die."""
        if not req.prompt_token_ids:
            raise FieldError("prompt_token_ids", "the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in (*req.prompt_token_ids, req.first_token)):
            raise FieldError("prompt_token_ids", f"ids (and first_token) must be in [0, {self.vocab_size})")
        if req.draft is not None and not 0 <= req.draft < self.vocab_size:
            raise FieldError("kv.draft_token", f"must be in [0, {self.vocab_size})")
        if req.prompt_len >= self.context_limit:
            raise FieldError("prompt_token_ids", f"{req.prompt_len} tokens leave no room in the context of "
                             f"{self.context_limit}")

    async def decode(self, req: DecodeRequest) -> AsyncIterator[DecodeEvent]:
        self.validate(req)
        rule = StopRule.of(req.sampling, self.eos, self.context_limit)
        reason = rule.reason(req.first_token, 1, req.prompt_len + 1)
        if reason is not None:  # finished on the prefill's token: nothing to step
            await self._release(req.lease)
            yield DecodeEvent([], reason, {}, {})
            return
        measured: dict[str, float] = {}
        request = Request(req.request_id, [*req.prompt_token_ids, req.first_token], req.sampling, rule,
                          prefix=KvPrefix(req.prompt_len, self._fetcher(req, measured)),
                          chunk_tokens=self.chunk_tokens, new_tokens=1, draft=req.draft)
        events = self.loop.submit(request)
        try:
            async for event in events:
                step = {**measured, "step": event.step_measured_s, "queue": event.queued_s}
                measured.clear()
                tokens = list(event.token_ids)
                modeled = {"step": event.step_modeled_s} if tokens else {}
                yield DecodeEvent(tokens, event.finish_reason, step, modeled, list(event.logprobs))
        finally:
            if not request.finished:  # the client left: end it before the next step
                self.loop.abort(request.request_id, FinishReason.CANCELLED)

    def _fetcher(self, req: DecodeRequest, measured: dict[str, float]):
        """The prompt's KV as the scheduler admits the request: the leading run of its blocks the
        pool still holds. The first read ends the prefill's lease, with the same Gets (the pool may
        evict the blocks from then on); a read that fails before it reaches the pool keeps it
        (until its ttl) for a retry on another instance."""
        lease = [req.lease]

        async def fetch() -> list:  # in the step loop's task, in the request's trace
            with _TRACER.start_as_current_span("decode.kv_load", attributes={
                    "request_id": req.request_id, "blocks": len(req.block_keys), "prompt_tokens": req.prompt_len}):
                start = time.perf_counter()
                held, lease[0] = lease[0], None
                blocks = await self._fetch(req, held if held is not None and held.lease_ids else None)
                measured["kv_load"] = measured.get("kv_load", 0.0) + time.perf_counter() - start
            return blocks

        return fetch

    async def _fetch(self, req: DecodeRequest, release: Lease | None) -> list:
        blocks = await leading_blocks(self.pool, req.block_keys, release)
        held = sum(kv.shape[1] for kv in blocks)
        if len(blocks) == len(req.block_keys) and held != req.prompt_len:
            raise FieldError("kv", f"the blocks hold {held} tokens, the prompt has {req.prompt_len}")
        return blocks

    async def _release(self, lease: Lease | None) -> None:
        if lease is not None and lease.lease_ids:
            await self.pool.release(lease)
