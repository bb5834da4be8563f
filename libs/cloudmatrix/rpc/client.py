"""What every service client shares: one channel, a deadline on every call, bounded retries of
idempotent calls, W3C trace context in the metadata, and failed calls raised as ``CallError``.

A ``CallError`` is a ``grpc.aio.AioRpcError`` (code, details and all, so code that handles gRPC
errors keeps working) that is also the house exception of its kind: ``PeerUnavailable`` for
UNAVAILABLE, ``ResourceExhausted``, ``FieldError`` (a ValueError naming the field) for
INVALID_ARGUMENT, ``TimeoutError`` for DEADLINE_EXCEEDED. It names the method and the address it failed on.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import grpc
from opentelemetry import propagate

from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.channel import DEFAULT_MAX_MESSAGE_BYTES, make_channel
from cloudmatrix.rpc.errors import FIELD_KEY, PeerUnavailable, ResourceExhausted

RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})  # the call never ran: safe to repeat


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """How a client calls: ``deadline_s`` per call (a call may override it), ``retries`` more
    attempts of an idempotent call that failed UNAVAILABLE, after ``backoff_s``, 2x, 4x..."""

    deadline_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.05
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    credentials: grpc.ChannelCredentials | None = None  # None = plaintext
    metadata: tuple[tuple[str, str], ...] = ()  # sent with every call (e.g. an API key)

    def __post_init__(self) -> None:
        if self.deadline_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"need deadline_s > 0, retries >= 0, backoff_s >= 0; got {self.deadline_s}, "
                             f"{self.retries}, {self.backoff_s}")


class CallError(grpc.aio.AioRpcError):
    """A failed call: its status, and the method and address it failed on."""

    def __init__(self, err: grpc.aio.AioRpcError, method: str, address: str) -> None:
        super().__init__(err.code(), err.initial_metadata(), err.trailing_metadata(), err.details(),
                         err.debug_error_string())
        self.method, self.address = method, address

    def __str__(self) -> str:
        return f"{self.method} at {self.address}: {self.code().name}: {self.details() or 'no details'}"


class Unavailable(CallError, PeerUnavailable):
    pass


class Exhausted(CallError, ResourceExhausted):
    pass


class InvalidArgument(FieldError, CallError):
    """INVALID_ARGUMENT; ``field`` is the one the service named ("request" if it named none)."""

    def __init__(self, err: grpc.aio.AioRpcError, method: str, address: str) -> None:
        CallError.__init__(self, err, method, address)
        self.field = field_of(err) or "request"


class DeadlineExceeded(CallError, TimeoutError):
    pass


_KINDS = {grpc.StatusCode.UNAVAILABLE: Unavailable, grpc.StatusCode.RESOURCE_EXHAUSTED: Exhausted,
          grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded}


def field_of(err: grpc.aio.AioRpcError) -> str | None:
    """The field an INVALID_ARGUMENT names (its trailing metadata, set by rpc/errors.py)."""
    return next((v for k, v in (err.trailing_metadata() or ()) if k == FIELD_KEY), None)


def call_error(err: grpc.aio.AioRpcError, method: str, address: str) -> CallError:
    if isinstance(err, CallError):
        return err
    return _KINDS.get(err.code(), CallError)(err, method, address)


def trace_metadata(extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """``extra`` plus the current span's W3C trace context (the gRPC instrumentation, when on,
    replaces it with its client span's)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*extra, *carrier.items())


class ServerStream:
    """A server-streaming call: iterate its messages (failures raise ``CallError``); ``cancel()``
    drops it and reads it out, so its client span ends now rather than at exit."""

    def __init__(self, call: Any, method: str, address: str) -> None:
        self.call, self.method, self.address = call, method, address

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            async for message in self.call:
                yield message
        except grpc.aio.AioRpcError as err:
            raise call_error(err, self.method, self.address) from None

    async def cancel(self) -> None:
        if self.call.done():
            return
        self.call.cancel()
        try:
            async for _ in self.call:
                pass
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass


class ServiceClient:
    """One service at one address. Subclasses name the service and its generated stub and turn
    dataclasses and tensors into requests; ``unary`` / ``stream`` make the calls."""

    SERVICE: ClassVar[str]
    STUB: ClassVar[type]

    def __init__(self, address: str, options: ClientOptions | None = None, *,
                 channel: grpc.aio.Channel | None = None) -> None:
        self.address = address
        self.options = options or ClientOptions()
        self._owns_channel = channel is None
        self.channel = channel or make_channel(address, max_message_bytes=self.options.max_message_bytes,
                                               credentials=self.options.credentials)
        self.stub = self.STUB(self.channel)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, grace_s: float | None = None) -> None:
        """Close the channel; with ``grace_s``, calls in flight have that long to finish first
        (without it they are cancelled at once)."""
        if self._owns_channel:
            await self.channel.close(grace=grace_s)

    def _method(self, name: str) -> str:
        return f"{self.SERVICE}/{name.removesuffix('Serialized')}"  # PutSerialized: Put, with raw bytes

    async def unary(self, name: str, request: Any, *, idempotent: bool, deadline_s: float | None = None) -> Any:
        """Call unary (or client-streaming, with an iterable ``request``) method ``name``;
        idempotent calls are retried on UNAVAILABLE (a client stream only when it is a list)."""
        attempts = 1 + (self.options.retries if idempotent else 0)
        for n in range(attempts):
            try:
                return await getattr(self.stub, name)(request, timeout=deadline_s or self.options.deadline_s,
                                                      metadata=trace_metadata(self.options.metadata))
            except grpc.aio.AioRpcError as err:
                if n + 1 == attempts or err.code() not in RETRIED_CODES:
                    raise call_error(err, self._method(name), self.address) from None
            await asyncio.sleep(self.options.backoff_s * 2**n)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def stream(self, name: str, request: Any, deadline_s: float | None = None) -> ServerStream:
        """Start server-streaming method ``name`` (not retried: messages may already have arrived)."""
        call = getattr(self.stub, name)(request, timeout=deadline_s or self.options.deadline_s,
                                        metadata=trace_metadata(self.options.metadata))
        return ServerStream(call, self._method(name), self.address)
