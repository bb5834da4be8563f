"""GatewayClient: completions over the gateway's gRPC API (the OpenAI HTTP API's twin).

    async with GatewayClient("127.0.0.1:50051") as gateway:
        model = (await gateway.list_models())[0].id
        async for chunk in gateway.generate(model, "The supernode", SamplingParams(max_tokens=8)):
            print(chunk.text, end="")
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from cloudmatrix.clients.types import PRECISION_NAMES, GenerateChunk, ModelCard, Timing
from cloudmatrix.rpc.client import ServiceClient
from cloudmatrix.rpc.sampling import finish_from_proto, logprobs_from_proto, sampling_to_proto
from cloudmatrix.sampling_params import SamplingParams
from cmx.gateway.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayClient(ServiceClient):
    SERVICE = "cmx.gateway.v1.Gateway"
    STUB = gateway_pb2_grpc.GatewayStub

    async def list_models(self) -> list[ModelCard]:
        reply = await self.unary("ListModels", gateway_pb2.ListModelsRequest(), idempotent=True)
        return [ModelCard(m.id, PRECISION_NAMES.get(m.precision, "unspecified"), m.max_context_tokens)
                for m in reply.models]

    async def generate(self, model: str, prompt: str | list[int], sampling: SamplingParams = SamplingParams(),
                       request_id: str = "", deadline_s: float | None = None) -> AsyncIterator[GenerateChunk]:
        """Stream a completion of ``prompt`` (text, or token ids); not retried."""
        request = gateway_pb2.GenerateRequest(model=model, sampling=sampling_to_proto(sampling), stream=True,
                                              request_id=request_id)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        async for c in self.stream("Generate", request, deadline_s):
            yield GenerateChunk(c.request_id, c.text, list(c.token_ids), finish_from_proto(c.finish_reason),
                                {"prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens,
                                 "cached_tokens": c.usage.cached_tokens} if c.HasField("usage") else None,
                                Timing.from_proto(c.timing) if c.HasField("timing") else None,
                                [logprobs_from_proto(t) for t in c.logprobs],
                                [logprobs_from_proto(t) for t in c.prompt_logprobs])
