"""gRPC servicer of the gateway: Generate (server stream) and ListModels over the core."""
from __future__ import annotations

import contextlib
import hmac

import grpc

from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.errors import map_errors
from cloudmatrix.rpc.sampling import finish_to_proto, logprobs_to_proto, sampling_from_proto
from cloudmatrix.rpc.timing import timing_proto
from cmx.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.core import GatewayCore
from services.gateway.schema import Delta, Finish, GenerateRequest


def generate_request(r: gateway_pb2.GenerateRequest) -> GenerateRequest:
    prompt = r.text if r.WhichOneof("prompt") == "text" else list(r.token_ids.ids)
    return GenerateRequest(r.request_id, r.model, prompt, sampling_from_proto(r.sampling))


def final_chunk(request_id: str, finish: Finish, so_far: Delta | None = None) -> gateway_pb2.GenerateChunk:
    """The last chunk: the finish, after ``so_far`` (the whole completion of a unary answer)."""
    u, t = finish.usage, finish.timing
    so_far = so_far or Delta("", [])
    return gateway_pb2.GenerateChunk(
        request_id=request_id, text=so_far.text + finish.text, token_ids=so_far.token_ids,
        logprobs=[logprobs_to_proto(lp) for lp in so_far.logprobs],
        prompt_logprobs=[logprobs_to_proto(lp) for lp in so_far.prompt_logprobs],
        finish_reason=finish_to_proto(finish.reason),
        usage=gateway_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                cached_tokens=u.cached_tokens),
        timing=timing_proto(t.measured, t.modeled, measured_s=t.measured_s, modeled_s=t.modeled_s,
                            phases=("queue", "cache_load", "prefill", "decode")))


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore, api_keys: tuple[str, ...]) -> None:
        self.core, self.api_keys = core, api_keys

    @map_errors
    async def Generate(self, request, context):
        await self._authenticate(context)
        try:
            prepared = self.core.prepare(generate_request(request))
        except FieldError:
            self.core.metrics.observe_invalid()
            raise
        whole = Delta("", [])
        async with contextlib.aclosing(self.core.generate(prepared)) as events:
            async for event in events:
                if isinstance(event, Finish):
                    yield final_chunk(prepared.request_id, event, None if request.stream else whole)
                elif request.stream:
                    yield gateway_pb2.GenerateChunk(
                        request_id=prepared.request_id, text=event.text, token_ids=event.token_ids,
                        logprobs=[logprobs_to_proto(lp) for lp in event.logprobs],
                        prompt_logprobs=[logprobs_to_proto(lp) for lp in event.prompt_logprobs])
                else:
                    whole = Delta(whole.text + event.text, whole.token_ids + event.token_ids,
                                  whole.logprobs + event.logprobs, whole.prompt_logprobs + event.prompt_logprobs)

    @map_errors
    async def ListModels(self, request, context):
        await self._authenticate(context)
        model = self.core.model
        return gateway_pb2.ListModelsReply(models=[gateway_pb2.ModelInfo(
            id=model.id, max_context_tokens=model.context_limit)])

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        """With api_keys set, the metadata must carry ``authorization: Bearer <key>``."""
        if not self.api_keys:
            return
        scheme, _, key = dict(context.invocation_metadata() or ()).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip(), k) for k in self.api_keys):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or incorrect API key: send metadata "
                                                                 "`authorization: Bearer <key>`")
