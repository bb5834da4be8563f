"""gRPC servicer of a decode instance."""
from __future__ import annotations

from cloudmatrix.errors import FieldError
from cloudmatrix.instance.build import instance_load
from cloudmatrix.kvcache import Lease
from cloudmatrix.rpc.errors import map_errors
from cloudmatrix.rpc.sampling import finish_to_proto, logprobs_to_proto, sampling_from_proto
from cloudmatrix.rpc.timing import timing_proto
from cmx.decode.v1 import decode_pb2, decode_pb2_grpc
from services.decode.core import DecodeCore, DecodeRequest


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, core: DecodeCore, instance_id: str, model_id: str, namespace: str) -> None:
        self.core, self.instance_id, self.model_id, self.namespace = core, instance_id, model_id, namespace

    def _request(self, r) -> DecodeRequest:
        if r.model and r.model != self.model_id:
            raise FieldError("model", f"this instance serves {self.model_id!r}, not {r.model!r}")
        if not r.request_id:
            raise FieldError("request_id", "must be set")
        if r.kv.namespace != self.namespace:
            raise FieldError("kv.namespace", f"{r.kv.namespace!r} is not this instance's {self.namespace!r}")
        if r.kv.num_tokens != len(r.prompt_token_ids) or not r.kv.block_keys:
            raise FieldError("kv", f"{r.kv.num_tokens} tokens in {len(r.kv.block_keys)} blocks does not match "
                             f"the {len(r.prompt_token_ids)}-token prompt")
        lease = Lease(dict(r.kv.lease_ids), (), 0.0) if r.kv.lease_ids else None
        return DecodeRequest(r.request_id, list(r.prompt_token_ids), r.first_token, list(r.kv.block_keys),
                             sampling_from_proto(r.sampling), lease,
                             r.kv.draft_token if r.kv.HasField("draft_token") else None)

    @map_errors
    async def Decode(self, request, context):
        async for event in self.core.decode(self._request(request)):
            yield decode_pb2.DecodeChunk(
                token_ids=event.token_ids, finished=event.finish_reason is not None,
                finish_reason=finish_to_proto(event.finish_reason),
                timing=timing_proto(event.measured, event.modeled, measured_s=sum(event.measured.values()),
                                    modeled_s=sum(event.modeled.values())),
                logprobs=[logprobs_to_proto(lp) for lp in event.logprobs])

    @map_errors
    async def Cancel(self, request, context):
        return decode_pb2.CancelReply(cancelled=self.core.cancel(request.request_id))

    @map_errors
    async def GetLoad(self, request, context):
        return decode_pb2.GetLoadReply(load=instance_load(self.core.loop, self.instance_id))
