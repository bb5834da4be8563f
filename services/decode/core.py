"""Decode, free of gRPC: take a request with its KV handle, pull the prompt's blocks from the
pool (then release the prefill's lease on them), and hand the request to the instance's scheduler,
which admits it when its blocks fit, steps it with every other running request (continuous
batching), preempts it when the dies run out of blocks, and ends it at EOS, max_tokens, a stop
token or the context limit. Cancels and disconnects end it between steps.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from opentelemetry import trace

from cloudmatrix.errors import FieldError
from cloudmatrix.instance.loop import StepLoop
from cloudmatrix.instance.request import Request
from cloudmatrix.kvcache import Lease
from cloudmatrix.rpc.errors import PeerUnavailable
from cloudmatrix.rpc.tensor_codec import decode_tensor
from cloudmatrix.sampling_params import FinishReason, SamplingParams, StopRule
from cmx.common.v1 import common_pb2

_TRACER = trace.get_tracer(__name__)


@dataclasses.dataclass(frozen=True)
class DecodeRequest:
    request_id: str
    prompt_token_ids: list[int]
    first_token: int
    block_keys: list[bytes]
    sampling: SamplingParams        # its stop_token_ids and ignore_eos apply here; stop strings at the gateway
    lease: Lease | None = None      # the prefill's lease on the blocks; released once they are read

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
        if req.prompt_len >= self.context_limit:
            raise FieldError("prompt_token_ids", f"{req.prompt_len} tokens leave no room in the context of "
                             f"{self.context_limit}")

    async def decode(self, req: DecodeRequest) -> AsyncIterator[DecodeEvent]:
        self.validate(req)
        rule = StopRule.of(req.sampling, self.eos, self.context_limit)
        reason = rule.reason(req.first_token, 1, req.prompt_len + 1)
        if reason is not None:  # finished on the prefill's token: nothing to step
            await self._release_lease(req)
            yield DecodeEvent([], reason, {}, {})
            return
        self.loop.check_admission()  # refuse before any pool traffic
        with _TRACER.start_as_current_span("decode.kv_load", attributes={
                "request_id": req.request_id, "blocks": len(req.block_keys), "prompt_tokens": req.prompt_len}):
            start = time.perf_counter()
            prefix = await self._fetch(req)
            measured = {"kv_load": time.perf_counter() - start}
        # Read: the pool may evict the blocks now. A failed read keeps the lease (until its ttl)
        # for a retry on another decode instance.
        await self._release_lease(req)
        request = Request(req.request_id, [*req.prompt_token_ids, req.first_token], req.sampling, rule,
                          prefix_kv=prefix, chunk_tokens=self.chunk_tokens, new_tokens=1)
        async for event in self._run(request, measured):
            yield event

    async def _run(self, request: Request, measured: dict[str, float]) -> AsyncIterator[DecodeEvent]:
        self.loop.submit(request)
        try:
            async for event in self.loop.events(request):
                step = {**measured, "step": event.step_measured_s, "queue": event.queued_s}
                tokens = [event.token_id] if event.token_id is not None else []
                modeled = {"step": event.step_modeled_s} if tokens else {}
                yield DecodeEvent(tokens, event.finish_reason, step, modeled)
                measured = {}
        finally:
            if not request.finished:  # the client left: end it before the next step
                self.loop.abort(request.request_id, FinishReason.CANCELLED)

    async def _fetch(self, req: DecodeRequest) -> list:
        fetched = await self.pool.get_blocks(req.block_keys)
        missing = [k.hex() for k in req.block_keys if fetched.get(k) is None]
        if missing:
            raise PeerUnavailable(f"kvcache: {len(missing)} of the prompt's blocks are gone, e.g. {missing[0]}")
        blocks = [decode_tensor(common_pb2.Tensor.FromString(fetched[k].data), "kv") for k in req.block_keys]
        held = sum(kv.shape[1] for kv in blocks)
        if held != req.prompt_len:
            raise FieldError("kv", f"the blocks hold {held} tokens, the prompt has {req.prompt_len}")
        return blocks

    async def _release_lease(self, req: DecodeRequest) -> None:
        if req.lease is not None and req.lease.lease_ids:
            await self.pool.release(req.lease)
