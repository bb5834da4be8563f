"""A server interceptor that parses unary requests itself, so that bytes which are not a valid
message get INVALID_ARGUMENT naming the request type instead of gRPC's generic UNKNOWN (the parse
would otherwise fail inside gRPC, before any handler or ``map_errors`` runs). Streamed request
messages are parsed while the handler iterates them; ``rpc.errors`` maps their ``DecodeError``."""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class ParseRequests(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # streamed requests, raw-bytes methods: nothing to do here
        parse, method = handler.request_deserializer, details.method

        async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                return parse(raw)
            except DecodeError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"request: not a valid message for {method} (malformed protobuf)")

        if handler.response_streaming:
            async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext):
                replies = handler.unary_stream(await parsed(raw, context), context)
                if not inspect.isasyncgen(replies):  # a handler that writes with context.write
                    await replies
                    return
                async for reply in replies:
                    yield reply

            return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=handler.response_serializer)

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await handler.unary_unary(await parsed(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=handler.response_serializer)
