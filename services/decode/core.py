"""Decode, free of gRPC: admit a request with its KV handle, pull its blocks from the pool into a
die, and step it with every other running request (continuous batching through the StepBatcher),
yielding tokens until EOS, max_tokens, a stop token or the context limit. Leaving early (cancel,
client gone) frees the request's blocks at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

from opentelemetry import trace

from cloudmatrix.instance.batcher import StepBatcher
from cloudmatrix.instance.driver import InstanceDriver, StepInput
from cloudmatrix.model.sampling import SamplingParams
from cloudmatrix.rpc.errors import PeerUnavailable, ResourceExhausted
from cloudmatrix.rpc.tensor_codec import decode_tensor
from cmx.common.v1 import common_pb2

_TRACER = trace.get_tracer(__name__)


@dataclasses.dataclass(frozen=True)
class DecodeRequest:
    request_id: str
    prompt_len: int
    first_token: int
    block_keys: list[bytes]
    sampling: SamplingParams
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False


@dataclasses.dataclass(frozen=True)
class DecodeEvent:
    """Tokens produced by one step (or the finish), with measured / modeled seconds."""

    token_ids: list[int]
    finish_reason: str | None
    measured: dict[str, float]
    modeled: dict[str, float]


class DecodeCore:
    def __init__(self, driver: InstanceDriver, batcher: StepBatcher, pool, eos: int, context_limit: int,
                 max_running: int, max_waiting: int) -> None:
        self.driver, self.batcher, self.pool = driver, batcher, pool
        self.eos, self.context_limit = eos, context_limit
        self.slots = asyncio.Semaphore(max_running)
        self.max_waiting = max_waiting
        self.running = self.waiting = 0
        self.cancelled: dict[str, asyncio.Event] = {}

    def cancel(self, request_id: str) -> bool:
        """Ask a running request to stop after its current step; False if it is unknown."""
        event = self.cancelled.get(request_id)
        if event is None:
            return False
        event.set()
        return True

    async def decode(self, req: DecodeRequest) -> AsyncIterator[DecodeEvent]:
        if self.waiting >= self.max_waiting and self.slots.locked():
            raise ResourceExhausted(f"decode queue full ({self.waiting} waiting)")
        queued = time.perf_counter()
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.cancelled[req.request_id] = asyncio.Event()
        try:
            measured = {"queue": time.perf_counter() - queued}
            start = time.perf_counter()
            with _TRACER.start_as_current_span("decode.kv_load", attributes={
                    "request_id": req.request_id, "blocks": len(req.block_keys), "prompt_tokens": req.prompt_len}):
                await self._load(req)
            measured["kv_load"] = time.perf_counter() - start
            async for event in self._steps(req, measured):
                yield event
        finally:
            self.cancelled.pop(req.request_id, None)
            self.running -= 1
            self.slots.release()
            if req.request_id in self.driver.sequences:
                await asyncio.shield(self.driver.release(req.request_id))

    async def _load(self, req: DecodeRequest) -> None:
        fetched = await self.pool.get_blocks(req.block_keys)
        missing = [k.hex() for k in req.block_keys if fetched.get(k) is None]
        if missing:
            raise PeerUnavailable(f"kvcache: {len(missing)} of the prompt's blocks are gone, e.g. {missing[0]}")
        blocks = [decode_tensor(common_pb2.Tensor.FromString(fetched[k].data), "kv") for k in req.block_keys]
        await self.driver.adopt(req.request_id, blocks)
        if self.driver.sequences[req.request_id].cached != req.prompt_len:
            raise ValueError(f"kv: the blocks hold {self.driver.sequences[req.request_id].cached} tokens, "
                             f"the prompt has {req.prompt_len}")

    def _finish(self, token: int, produced: int, position: int, req: DecodeRequest) -> str | None:
        if token == self.eos and not req.ignore_eos or token in req.stop_token_ids:
            return "stop"
        if produced >= req.sampling.max_tokens or position >= self.context_limit:
            return "length"
        return None

    async def _steps(self, req: DecodeRequest, measured: dict[str, float]) -> AsyncIterator[DecodeEvent]:
        token, produced = req.first_token, 1  # prefill sampled the first token
        reason = self._finish(token, produced, req.prompt_len + 1, req)
        while reason is None:
            if self.cancelled[req.request_id].is_set():
                yield DecodeEvent([], "cancelled", measured, {})
                return
            outcome = await self.batcher.submit(StepInput(req.request_id, [token], req.sampling))
            token, produced = outcome.output.token_id, produced + 1
            reason = self._finish(token, produced, req.prompt_len + produced, req)
            step_measured = {**measured, "step": outcome.step_measured_s, "queue": measured.get("queue", 0.0)
                             + outcome.queued_s}
            yield DecodeEvent([token], reason, step_measured, {"step": outcome.step_modeled_s})
            measured = {}
        if produced == 1:  # finished on the first token: say so without stepping
            yield DecodeEvent([], reason, measured, {})
