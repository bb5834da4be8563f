"""gRPC servicer of a prefill instance: protos in, the core, protos out."""
from __future__ import annotations

import asyncio

from cloudmatrix.errors import FieldError
from cloudmatrix.instance.build import instance_load
from cloudmatrix.rpc.errors import map_errors
from cloudmatrix.rpc.sampling import logprobs_to_proto, sampling_from_proto
from cloudmatrix.rpc.timing import timing_proto
from cmx.common.v1 import common_pb2
from cmx.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from services.prefill.core import PrefillCore, PrefillResult

PHASES = ("queue", "cache_lookup", "cache_load", "compute", "kv_write")


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, core: PrefillCore, instance_id: str, model_id: str) -> None:
        self.core, self.instance_id, self.model_id = core, instance_id, model_id

    @map_errors
    async def Prefill(self, request, context):
        result = await self._prefill(request)
        return self._reply(request.request_id, result)

    @map_errors
    async def PrefillStream(self, request, context):
        # The first reply is sent while the write-back starts (not before it), so the write-backs of
        # prompts that finished in one step still start in one turn and share the pool's Put streams.
        sent: list[asyncio.Future] = []

        async def first_token(partial: PrefillResult) -> None:
            sent.append(asyncio.ensure_future(context.write(self._reply(request.request_id, partial))))

        try:
            result = await self._prefill(request, first_token)
            for write in sent:
                await write
        finally:
            for write in sent:
                write.cancel()
        await context.write(self._reply(request.request_id, result))

    async def _prefill(self, request, on_computed=None) -> PrefillResult:
        if request.model and request.model != self.model_id:
            raise FieldError("model", f"this instance serves {self.model_id!r}, not {request.model!r}")
        if not request.request_id:
            raise FieldError("request_id", "must be set")
        return await self.core.prefill(request.request_id, list(request.token_ids),
                                       sampling_from_proto(request.sampling), not request.disable_context_cache,
                                       on_computed)

    def _reply(self, request_id: str, result: PrefillResult) -> prefill_pb2.PrefillReply:
        """The reply for ``result``; while the prompt's KV is not yet in the pool, with no KV handle
        and no kv_write phase."""
        keys = result.keys
        timing = timing_proto(result.measured, result.modeled, measured_s=sum(result.measured.values()),
                              modeled_s=result.modeled["total"], phases=PHASES if result.in_pool else PHASES[:-1])
        kv = common_pb2.KvHandle(namespace=self.core.namespace, block_keys=list(keys.all),
                                 num_tokens=keys.num_tokens, block_size=keys.block_size,
                                 lease_ids=result.lease.lease_ids if result.lease else {},
                                 draft_token=result.draft) if result.in_pool else None
        return prefill_pb2.PrefillReply(
            request_id=request_id, first_token=result.first_token, kv=kv,
            cached_tokens=result.cached_tokens, computed_tokens=result.computed_tokens, timing=timing,
            first_token_logprob=result.logprobs.logprob if result.logprobs else 0.0,
            first_token_logprobs=logprobs_to_proto(result.logprobs) if result.logprobs else None,
            prompt_logprobs=[logprobs_to_proto(t) for t in result.prompt_logprobs])

    @map_errors
    async def GetLoad(self, request, context):
        return prefill_pb2.GetLoadReply(load=instance_load(self.core.loop, self.instance_id))
