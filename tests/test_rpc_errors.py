"""map_errors: exceptions -> gRPC status codes, for unary and streaming handlers."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.message import DecodeError

from cloudmatrix.rpc.errors import RETRY_AFTER_KEY, PeerUnavailable, ResourceExhausted, map_errors
from tests.rpc_helpers import run


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.trailing = ()

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    async def abort(self, code, details=""):
        raise Aborted(code, details, self.trailing)


def peer_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="die 3 gone")


@pytest.mark.parametrize("exc, code, details", [
    (ValueError("shape [2, 3] does not match 24 bytes"), grpc.StatusCode.INVALID_ARGUMENT,
     "shape [2, 3] does not match 24 bytes"),
    (ResourceExhausted("no free KV blocks"), grpc.StatusCode.RESOURCE_EXHAUSTED, "no free KV blocks"),
    (PeerUnavailable("kvcache shard 2 down"), grpc.StatusCode.UNAVAILABLE, "kvcache shard 2 down"),
    (asyncio.TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, "TimeoutError"),
    (peer_error(grpc.StatusCode.UNAVAILABLE), grpc.StatusCode.UNAVAILABLE, "peer: die 3 gone"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_map_errors_aborts_with_status(exc, code, details, streaming):
    async def unary(self, request, context):
        raise exc

    async def stream(self, request, context):
        yield "first"
        raise exc

    async def scenario():
        if not streaming:
            return await map_errors(unary)(None, None, FakeContext())
        return [item async for item in map_errors(stream)(None, None, FakeContext())]

    with pytest.raises(Aborted) as info:
        run(scenario())
    retry = ((RETRY_AFTER_KEY, "1"),) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else ()
    assert info.value.args == (code, details, retry)  # "not now" says when to retry


def test_a_stream_message_that_is_not_protobuf_is_invalid_argument():
    async def stream(self, request_iterator, context):
        raise DecodeError("Error parsing message")
        yield

    async def scenario():
        return [item async for item in map_errors(stream)(None, None, FakeContext())]

    with pytest.raises(Aborted) as info:
        run(scenario())
    assert info.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT and info.value.args[1].startswith("request: ")


def test_map_errors_lets_other_exceptions_through():
    @map_errors
    async def handler(request, context):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run(handler(None, FakeContext()))
    with pytest.raises(TypeError):
        map_errors(lambda request, context: None)

