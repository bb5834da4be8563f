"""The gateway's outbound calls to prefill and decode instances: one client per instance, every
call with a deadline, protos converted to the core's dataclasses, and failed calls turned into
the house exceptions (UNAVAILABLE -> PeerUnavailable, DEADLINE_EXCEEDED -> TimeoutError,
RESOURCE_EXHAUSTED -> ResourceExhausted, INVALID_ARGUMENT naming a field -> FieldError, anything
else -> InstanceFailed, a 500). Their messages carry the instance's own words, never an address or a gRPC class
name; the address goes to the log."""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import AsyncIterator

import grpc

from cloudmatrix.clients.instances import DecodeClient, DecodeStream, PrefillClient
from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.client import ClientOptions, field_of
from cloudmatrix.rpc.errors import PeerUnavailable, ResourceExhausted
from services.gateway.schema import PrefillOutcome, Prepared

log = logging.getLogger(__name__)
_RAISED = {grpc.StatusCode.UNAVAILABLE: PeerUnavailable, grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError,
           grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted}


_ADDRESS = re.compile(r"(ipv[46]:)?(\[[0-9a-fA-F:.]+\]|[0-9]{1,3}(\.[0-9]{1,3}){3}|[\w.-]+\.[\w-]+):[0-9]+")


class InstanceFailed(RuntimeError):
    """An instance answered a call with an unexpected status (an internal error there)."""


def converted(err: grpc.aio.AioRpcError, address: str) -> Exception:
    """The house exception for a failed call to ``address``."""
    log.warning("instance call failed", extra={"address": address, "code": err.code().name,
                                               "details": err.details()})
    kind = _RAISED.get(err.code())
    details = _ADDRESS.sub("an instance", err.details() or "")  # gRPC's own connect errors name them
    field = field_of(err)
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT and field:  # the request's fault: the instance says which field
        return FieldError(field, details.removeprefix(f"{field}: "))
    if kind is None:
        return InstanceFailed(f"an instance failed ({err.code().name}): {details or 'no details'}")
    return kind(details or err.code().name)


class GatewayDecodeStream:
    """One Decode call, its failures in the gateway's words; ``close()`` drops an unfinished call
    (the instance frees the request's blocks)."""

    def __init__(self, stream: DecodeStream, address: str) -> None:
        self.stream, self.address = stream, address

    async def __aiter__(self):
        try:
            async for step in self.stream:
                yield step
        except grpc.aio.AioRpcError as err:
            raise converted(err, self.address) from err

    async def close(self) -> None:
        await self.stream.cancel()


class GrpcBackend:
    """The prefill and decode instances, each through its client (no retries here: the gateway's
    picker fails a request over to another instance instead). A client is made at the first call
    to its instance (instances are discovered while the gateway runs) and closed when the picker
    retires the instance."""

    def __init__(self, max_message_bytes: int) -> None:
        self.options = ClientOptions(retries=0, max_message_bytes=max_message_bytes)
        self.prefills: dict[str, PrefillClient] = {}
        self.decodes: dict[str, DecodeClient] = {}

    def _prefill(self, address: str) -> PrefillClient:
        return self.prefills.get(address) or self.prefills.setdefault(address, PrefillClient(address, self.options))

    def _decode(self, address: str) -> DecodeClient:
        return self.decodes.get(address) or self.decodes.setdefault(address, DecodeClient(address, self.options))

    async def retire_prefill(self, address: str) -> None:
        await _close(self.prefills.pop(address, None))

    async def retire_decode(self, address: str) -> None:
        await _close(self.decodes.pop(address, None))

    async def prefill(self, address: str, p: Prepared, timeout_s: float) -> AsyncIterator[PrefillOutcome]:
        """The first token as soon as the instance computed it (``kv`` None), then the outcome with
        the KV handle once the prompt's KV is in the pool."""
        stream = self._prefill(address).prefill_stream(p.request_id, p.model, p.token_ids, p.sampling,
                                                       deadline_s=timeout_s)
        try:
            async for r in stream:
                yield PrefillOutcome(r.first_token, r.kv, r.cached_tokens, r.timing.measured, r.timing.modeled,
                                     r.timing.modeled_s, r.logprobs, r.prompt_logprobs)
        except grpc.aio.AioRpcError as err:
            raise converted(err, address) from err
        finally:
            await stream.aclose()

    def decode(self, address: str, p: Prepared, first: PrefillOutcome, timeout_s: float) -> GatewayDecodeStream:
        sampling = dataclasses.replace(p.sampling, prompt_logprobs=None)  # the prefill had the prompt's
        stream = self._decode(address).decode(p.request_id, p.model, p.token_ids, first.first_token, first.kv,
                                              sampling, deadline_s=timeout_s)
        return GatewayDecodeStream(stream, address)

    async def cancel(self, address: str, request_id: str, timeout_s: float) -> bool:
        try:
            return await self._decode(address).cancel(request_id, deadline_s=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise converted(err, address) from err

    async def prefill_load(self, address: str, timeout_s: float) -> int:
        return await self._load(self._prefill(address), address, timeout_s)

    async def decode_load(self, address: str, timeout_s: float) -> int:
        return await self._load(self._decode(address), address, timeout_s)

    async def _load(self, client: PrefillClient | DecodeClient, address: str, timeout_s: float) -> int:
        try:
            return (await client.load(deadline_s=timeout_s)).requests
        except grpc.aio.AioRpcError as err:
            raise converted(err, address) from err

    async def close(self) -> None:
        for client in (*self.prefills.values(), *self.decodes.values()):
            await client.close()
        self.prefills.clear()
        self.decodes.clear()


async def _close(client: PrefillClient | DecodeClient | None) -> None:
    if client is not None:
        await client.close()
