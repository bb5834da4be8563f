"""Exceptions -> gRPC status codes, for servicers.

The house mapping: bad input (``ValueError``) -> INVALID_ARGUMENT, "not now"
(``ResourceExhausted``) -> RESOURCE_EXHAUSTED, a dead peer (``PeerUnavailable``) -> UNAVAILABLE,
a timeout (``TimeoutError``, which ``asyncio.TimeoutError`` is) -> DEADLINE_EXCEEDED. A failed
outbound call (``grpc.aio.AioRpcError``) with one of the last three codes keeps its code.
Anything else propagates, and gRPC answers UNKNOWN.

    class NpuServicer(npu_pb2_grpc.NpuEmulatorServicer):
        @map_errors
        async def RunStep(self, request, context): ...

        @map_errors
        async def StreamTokens(self, request, context):  # async generator: server streaming
            yield ...
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

F = TypeVar("F", bound=Callable[..., Any])

_PASSED_THROUGH = frozenset({
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
})


RETRY_AFTER_KEY = "retry-after"  # trailing metadata of RESOURCE_EXHAUSTED: seconds to wait
RETRY_AFTER_S = 1


class ResourceExhausted(Exception):
    """The request is fine but cannot be served now (queue full, no KV blocks); retry later."""


class PeerUnavailable(Exception):
    """A peer service this request needs is down or unreachable."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The (code, details) an exception maps to, or None when it is not one of ours."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return _status_for_rpc_error(exc)
    for kind, code in _EXCEPTION_CODES:
        if isinstance(exc, kind):
            return code, _details(exc)
    return None


_EXCEPTION_CODES = (
    (DecodeError, grpc.StatusCode.INVALID_ARGUMENT),  # a streamed request message that does not parse
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PeerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


def _status_for_rpc_error(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str] | None:
    if exc.code() not in _PASSED_THROUGH:
        return None
    return exc.code(), f"peer: {exc.details() or exc.code().name}"


def _details(exc: BaseException) -> str:
    if isinstance(exc, DecodeError):
        return f"request: a message of the stream is not valid protobuf ({' '.join(str(exc).split())})"
    return " ".join(str(exc).split()) or type(exc).__name__


async def abort_for(exc: Exception, context: grpc.aio.ServicerContext) -> None:
    """Abort the RPC with the status ``exc`` maps to; re-raise ``exc`` when it maps to none."""
    status = status_for(exc)
    if status is None:
        raise exc
    if status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED:  # "not now": tell the caller when to retry
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(RETRY_AFTER_S)),))
    await context.abort(*status)


def map_errors(handler: F) -> F:
    """Decorate an aio servicer method (coroutine or async generator) so that mapped exceptions
    abort the RPC with their status code. The context is the handler's last positional argument."""
    if inspect.isasyncgenfunction(handler):
        return _wrap_stream(handler)  # type: ignore[return-value]
    if inspect.iscoroutinefunction(handler):
        return _wrap_unary(handler)  # type: ignore[return-value]
    raise TypeError(f"map_errors needs an async def handler, got {handler!r}")


def _wrap_unary(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        try:
            return await handler(*args)
        except Exception as exc:  # re-raised by abort_for unless it maps to a status
            await abort_for(exc, args[-1])
            raise

    return wrapper


def _wrap_stream(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        try:
            async for item in handler(*args):
                yield item
        except Exception as exc:  # re-raised by abort_for unless it maps to a status
            await abort_for(exc, args[-1])
            raise

    return wrapper
