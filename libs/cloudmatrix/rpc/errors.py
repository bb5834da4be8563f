"""The one table from the house exceptions (cloudmatrix/errors.py) to a gRPC status, an HTTP
status, OpenAI's error type and code, and Retry-After; and ``map_errors``, which servicers wear.

| exception                | gRPC               | HTTP | OpenAI type / code                          | Retry-After |
|--------------------------|--------------------|------|---------------------------------------------|-------------|
| UnknownModel             | INVALID_ARGUMENT   | 400  | invalid_request_error / model_not_found     |             |
| FieldError, DecodeError  | INVALID_ARGUMENT   | 400  | invalid_request_error / invalid_value       |             |
| ResourceExhausted        | RESOURCE_EXHAUSTED | 429  | rate_limit_error / rate_limit_exceeded      | 1 s         |
| PeerUnavailable          | UNAVAILABLE        | 503  | service_unavailable / instance_unavailable  | 2 s         |
| TimeoutError             | DEADLINE_EXCEEDED  | 504  | timeout_error / deadline_exceeded           |             |
| anything else            | INTERNAL           | 500  | internal_error / internal_error             |             |

A failed outbound call (``grpc.aio.AioRpcError``) that is RESOURCE_EXHAUSTED, UNAVAILABLE or
DEADLINE_EXCEEDED keeps its code; any other answer of a peer is a bug of ours (we sent it
something it refused), so INTERNAL. Anything else is a bug of ours (a plain ``ValueError`` too: bad
input raises ``FieldError``): logged with its traceback and answered INTERNAL without internals.
A FieldError's field travels in the trailing metadata (``cmx-field``), so a client can raise it
again; Retry-After travels as ``retry-after`` (seconds).

    class NpuServicer(npu_pb2_grpc.NpuEmulatorServicer):
        @map_errors
        async def RunStep(self, request, context): ...

        @map_errors
        async def StreamTokens(self, request, context):  # async generator: server streaming
            yield ...
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from cloudmatrix.errors import FieldError, PeerUnavailable, ResourceExhausted, UnknownModel

__all__ = ["ERROR_KINDS", "FIELD_KEY", "INTERNAL", "RETRY_AFTER_KEY", "ErrorKind", "FieldError", "PeerUnavailable",
           "ResourceExhausted", "abort_for", "kind_of", "map_errors", "status_for"]

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after"  # trailing metadata: seconds to wait before retrying
FIELD_KEY = "cmx-field"          # trailing metadata of INVALID_ARGUMENT from a FieldError: the field


@dataclasses.dataclass(frozen=True)
class ErrorKind:
    exception: type[BaseException]
    grpc_code: grpc.StatusCode
    http_status: int
    openai_type: str
    openai_code: str
    retry_after_s: int | None = None


ERROR_KINDS = (  # the first match wins
    ErrorKind(UnknownModel, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", "model_not_found"),
    ErrorKind(FieldError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", "invalid_value"),
    ErrorKind(DecodeError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", "invalid_value"),
    ErrorKind(ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", "rate_limit_exceeded",
              1),
    ErrorKind(PeerUnavailable, grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable", "instance_unavailable", 2),
    ErrorKind(TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error", "deadline_exceeded"),
)
INTERNAL = ErrorKind(Exception, grpc.StatusCode.INTERNAL, 500, "internal_error", "internal_error")
_BY_CODE = {k.grpc_code: k for k in reversed(ERROR_KINDS)}  # a peer's status: the code's first kind
_PASSED_THROUGH = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                             grpc.StatusCode.DEADLINE_EXCEEDED})


def kind_of(exc: BaseException) -> ErrorKind:
    """The row of the table ``exc`` falls under; INTERNAL when it is none of ours."""
    if isinstance(exc, grpc.aio.AioRpcError):  # a failed call to a peer (a client's CallError too)
        return _BY_CODE[exc.code()] if exc.code() in _PASSED_THROUGH else INTERNAL
    return next((k for k in ERROR_KINDS if isinstance(exc, k.exception)), INTERNAL)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The (code, details) ``exc`` is answered with. INTERNAL's details say nothing of the bug."""
    kind = kind_of(exc)
    if kind is INTERNAL:
        return grpc.StatusCode.INTERNAL, "internal error (the service logged it)"
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), f"peer: {exc.details() or exc.code().name}"
    if isinstance(exc, DecodeError):
        return kind.grpc_code, f"request: a message of the stream is not valid protobuf ({' '.join(str(exc).split())})"
    return kind.grpc_code, " ".join(str(exc).split()) or type(exc).__name__


def trailing_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    kind, metadata = kind_of(exc), []
    if isinstance(exc, FieldError) and kind.grpc_code == grpc.StatusCode.INVALID_ARGUMENT:
        metadata.append((FIELD_KEY, exc.field))
    if kind.retry_after_s is not None:
        metadata.append((RETRY_AFTER_KEY, str(kind.retry_after_s)))
    return tuple(metadata)


async def abort_for(exc: Exception, context: grpc.aio.ServicerContext) -> None:
    """Abort the RPC with the status ``exc`` maps to (logging it first when it is INTERNAL)."""
    code, details = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error answering a call", exc_info=exc)
    metadata = trailing_metadata(exc)
    if metadata:
        context.set_trailing_metadata(metadata)
    await context.abort(code, details)


def map_errors(handler: F) -> F:
    """Decorate an aio servicer method (coroutine or async generator) so that every exception
    aborts the RPC with its status code. The context is the handler's last positional argument."""
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
        except grpc.aio.AbortError:
            raise  # the handler aborted the call itself (context.abort)
        except Exception as exc:
            await abort_for(exc, args[-1])
            raise

    return wrapper


def _wrap_stream(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        try:
            async for item in handler(*args):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_for(exc, args[-1])
            raise

    return wrapper
