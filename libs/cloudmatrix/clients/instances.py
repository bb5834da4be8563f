"""PrefillClient and DecodeClient: the gateway's calls to a prefill or decode instance.

    async with PrefillClient(prefill_address) as prefill, DecodeClient(decode_address) as decode:
        first = await prefill.prefill("req-1", "tiny-int8", prompt_ids, sampling)
        stream = decode.decode("req-1", "tiny-int8", prompt_ids, first.first_token, first.kv, sampling)
        async for step in stream:
            ...
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from cloudmatrix.clients.types import DecodeStep, InstanceLoad, PrefillResult, Timing
from cloudmatrix.rpc.client import ServerStream, ServiceClient
from cloudmatrix.rpc.sampling import finish_from_proto, logprobs_from_proto, sampling_to_proto
from cloudmatrix.sampling_params import SamplingParams
from cmx.decode.v1 import decode_pb2, decode_pb2_grpc
from cmx.prefill.v1 import prefill_pb2, prefill_pb2_grpc


class PrefillClient(ServiceClient):
    SERVICE = "cmx.prefill.v1.Prefill"
    STUB = prefill_pb2_grpc.PrefillStub

    async def prefill(self, request_id: str, model: str, token_ids: list[int], sampling: SamplingParams = SamplingParams(),
                      *, disable_context_cache: bool = False, deadline_s: float | None = None) -> PrefillResult:
        """The prompt's KV into the pool and its first token; not retried (it writes KV)."""
        return _result(await self.unary("Prefill", _request(request_id, model, token_ids, sampling,
                                                            disable_context_cache),
                                        idempotent=False, deadline_s=deadline_s))

    async def prefill_stream(self, request_id: str, model: str, token_ids: list[int],
                             sampling: SamplingParams = SamplingParams(), *, disable_context_cache: bool = False,
                             deadline_s: float | None = None) -> AsyncIterator[PrefillResult]:
        """The same prefill answered twice: the first token as soon as the prompt is computed (its
        ``kv`` None), then the whole result once the prompt's KV is in the pool; not retried."""
        request = _request(request_id, model, token_ids, sampling, disable_context_cache)
        stream = self.stream("PrefillStream", request, deadline_s)
        try:
            async for reply in stream:
                yield _result(reply)
        finally:
            await stream.cancel()  # a no-op once it ended; else the instance stops the prefill

    async def load(self, deadline_s: float | None = None) -> InstanceLoad:
        reply = await self.unary("GetLoad", prefill_pb2.GetLoadRequest(), idempotent=True, deadline_s=deadline_s)
        return InstanceLoad.from_proto(reply.load)


def _request(request_id: str, model: str, token_ids: list[int], sampling: SamplingParams,
             disable_context_cache: bool) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(request_id=request_id, model=model, token_ids=token_ids,
                                      sampling=sampling_to_proto(sampling), disable_context_cache=disable_context_cache)


def _result(r: prefill_pb2.PrefillReply) -> PrefillResult:
    return PrefillResult(r.first_token, r.first_token_logprob, r.kv if r.HasField("kv") else None, r.cached_tokens,
                         r.computed_tokens, Timing.from_proto(r.timing),
                         logprobs_from_proto(r.first_token_logprobs) if r.HasField("first_token_logprobs") else None,
                         [logprobs_from_proto(t) for t in r.prompt_logprobs])


class DecodeStream:
    """One Decode call: iterate its steps; ``cancel()`` drops an unfinished call (the instance
    frees the request's blocks)."""

    def __init__(self, stream: ServerStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[DecodeStep]:
        async for chunk in self._stream:
            yield DecodeStep(list(chunk.token_ids), finish_from_proto(chunk.finish_reason) if chunk.finished
                             else None, chunk.timing.modeled_s, [logprobs_from_proto(t) for t in chunk.logprobs])

    async def cancel(self) -> None:
        await self._stream.cancel()


class DecodeClient(ServiceClient):
    SERVICE = "cmx.decode.v1.Decode"
    STUB = decode_pb2_grpc.DecodeStub

    def decode(self, request_id: str, model: str, prompt_token_ids: list[int], first_token: int, kv: Any,
               sampling: SamplingParams = SamplingParams(), deadline_s: float | None = None) -> DecodeStream:
        """Continue a prefilled request (its first token and KV handle, as prefill answered);
        not retried."""
        request = decode_pb2.DecodeRequest(request_id=request_id, model=model, prompt_token_ids=prompt_token_ids,
                                           first_token=first_token, kv=kv, sampling=sampling_to_proto(sampling))
        return DecodeStream(self.stream("Decode", request, deadline_s))

    async def cancel(self, request_id: str, deadline_s: float | None = None) -> bool:
        """False when the instance did not know the request or it had finished (idempotent)."""
        reply = await self.unary("Cancel", decode_pb2.CancelRequest(request_id=request_id), idempotent=True,
                                 deadline_s=deadline_s)
        return reply.cancelled

    async def load(self, deadline_s: float | None = None) -> InstanceLoad:
        reply = await self.unary("GetLoad", decode_pb2.GetLoadRequest(), idempotent=True, deadline_s=deadline_s)
        return InstanceLoad.from_proto(reply.load)
