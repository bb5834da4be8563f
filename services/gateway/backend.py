"""The gateway's outbound calls to prefill and decode instances: one channel per instance, every
call with a deadline, protos converted to the core's dataclasses, and failed calls turned into
the house exceptions (UNAVAILABLE -> PeerUnavailable, DEADLINE_EXCEEDED -> TimeoutError,
RESOURCE_EXHAUSTED -> ResourceExhausted, INVALID_ARGUMENT -> ValueError, anything else ->
InstanceFailed). Their messages carry the instance's own words, never an address or a gRPC class
name; the address goes to the log."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from cloudmatrix.rpc.channel import make_channel
from cloudmatrix.rpc.errors import PeerUnavailable, ResourceExhausted
from cmx.common.v1 import common_pb2
from cmx.decode.v1 import decode_pb2, decode_pb2_grpc
from cmx.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from services.gateway.schema import DecodeStep, PrefillOutcome, Prepared, Sampling

log = logging.getLogger(__name__)
FINISH_NAMES = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                common_pb2.FINISH_REASON_CANCELLED: "cancelled"}
_RAISED = {grpc.StatusCode.UNAVAILABLE: PeerUnavailable, grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError,
           grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted, grpc.StatusCode.INVALID_ARGUMENT: ValueError}


class InstanceFailed(RuntimeError):
    """An instance answered a call with an unexpected status (an internal error there)."""


def converted(err: grpc.aio.AioRpcError, address: str) -> Exception:
    """The house exception for a failed call to ``address``."""
    log.warning("instance call failed", extra={"address": address, "code": err.code().name,
                                               "details": err.details()})
    kind = _RAISED.get(err.code())
    if kind is None:
        return InstanceFailed(f"an instance failed ({err.code().name}): {err.details() or 'no details'}")
    return kind(err.details() or err.code().name)


def sampling_proto(s: Sampling) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                                     max_tokens=s.max_tokens, stop_token_ids=list(s.stop_token_ids),
                                     ignore_eos=s.ignore_eos)


class DecodeStream:
    """One Decode call: iterate its steps; ``close()`` drops an unfinished call (the instance frees the
    request's blocks)."""

    def __init__(self, call, address: str) -> None:
        self.call, self.address = call, address

    async def __aiter__(self) -> AsyncIterator[DecodeStep]:
        try:
            async for chunk in self.call:
                yield DecodeStep(list(chunk.token_ids), FINISH_NAMES.get(chunk.finish_reason) if chunk.finished
                                 else None, chunk.timing.modeled_s)
        except grpc.aio.AioRpcError as err:
            raise converted(err, self.address) from err

    async def close(self) -> None:
        """Drop the call unless it ended; read it out so its client span ends now, not at exit."""
        if self.call.done():
            return
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for _ in self.call:
                pass


class GrpcBackend:
    def __init__(self, prefill: tuple[str, ...], decode: tuple[str, ...], max_message_bytes: int) -> None:
        self.channels = {a: make_channel(a, max_message_bytes=max_message_bytes) for a in {*prefill, *decode}}
        self.prefills = {a: prefill_pb2_grpc.PrefillStub(self.channels[a]) for a in prefill}
        self.decodes = {a: decode_pb2_grpc.DecodeStub(self.channels[a]) for a in decode}

    async def prefill(self, address: str, p: Prepared, timeout_s: float) -> PrefillOutcome:
        request = prefill_pb2.PrefillRequest(request_id=p.request_id, model=p.model, token_ids=p.token_ids,
                                             sampling=sampling_proto(p.sampling))
        try:
            reply = await self.prefills[address].Prefill(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise converted(err, address) from err
        phases = reply.timing.phases
        return PrefillOutcome(reply.first_token, reply.kv, reply.cached_tokens,
                              {t.phase: t.measured_s for t in phases}, {t.phase: t.modeled_s for t in phases},
                              reply.timing.modeled_s)

    def decode(self, address: str, p: Prepared, first: PrefillOutcome, timeout_s: float) -> DecodeStream:
        request = decode_pb2.DecodeRequest(request_id=p.request_id, model=p.model, prompt_token_ids=p.token_ids,
                                           first_token=first.first_token, kv=first.kv,
                                           sampling=sampling_proto(p.sampling))
        return DecodeStream(self.decodes[address].Decode(request, timeout=timeout_s), address)

    async def cancel(self, address: str, request_id: str, timeout_s: float) -> bool:
        try:
            reply = await self.decodes[address].Cancel(decode_pb2.CancelRequest(request_id=request_id),
                                                       timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise converted(err, address) from err
        return reply.cancelled

    async def prefill_load(self, address: str, timeout_s: float) -> int:
        return await self._load(self.prefills[address], prefill_pb2.GetLoadRequest(), address, timeout_s)

    async def decode_load(self, address: str, timeout_s: float) -> int:
        return await self._load(self.decodes[address], decode_pb2.GetLoadRequest(), address, timeout_s)

    async def _load(self, stub, request, address: str, timeout_s: float) -> int:
        try:
            reply = await stub.GetLoad(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise converted(err, address) from err
        return reply.load.running_requests + reply.load.waiting_requests

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
