"""map_errors: exceptions -> gRPC status codes by the one table, for unary and streaming
handlers; a bug answers INTERNAL, logged, without its message."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.message import DecodeError

from cloudmatrix.errors import FieldError, UnknownModel
from cloudmatrix.rpc.errors import FIELD_KEY, RETRY_AFTER_KEY, PeerUnavailable, ResourceExhausted, kind_of, map_errors
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


INTERNAL_DETAILS = "internal error (the service logged it)"


@pytest.mark.parametrize("exc, code, details, trailing", [
    (FieldError("shape", "[2, 3] does not match 24 bytes"), grpc.StatusCode.INVALID_ARGUMENT,
     "shape: [2, 3] does not match 24 bytes", ((FIELD_KEY, "shape"),)),
    (ResourceExhausted("no free KV blocks"), grpc.StatusCode.RESOURCE_EXHAUSTED, "no free KV blocks",
     ((RETRY_AFTER_KEY, "1"),)),
    (PeerUnavailable("kvcache shard 2 down"), grpc.StatusCode.UNAVAILABLE, "kvcache shard 2 down",
     ((RETRY_AFTER_KEY, "2"),)),
    (asyncio.TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, "TimeoutError", ()),
    (peer_error(grpc.StatusCode.UNAVAILABLE), grpc.StatusCode.UNAVAILABLE, "peer: die 3 gone",
     ((RETRY_AFTER_KEY, "2"),)),
    # a peer that refused what we sent, and plain ValueErrors and TypeErrors, are bugs of ours
    (peer_error(grpc.StatusCode.INVALID_ARGUMENT), grpc.StatusCode.INTERNAL, INTERNAL_DETAILS, ()),
    (ValueError("shape [2, 3] does not match 24 bytes"), grpc.StatusCode.INTERNAL, INTERNAL_DETAILS, ()),
    (TypeError("unsupported operand type(s) for +: 'int' and 'str'"), grpc.StatusCode.INTERNAL,
     INTERNAL_DETAILS, ()),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_map_errors_aborts_with_status(exc, code, details, trailing, streaming, caplog):
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
    assert info.value.args == (code, details, trailing)  # "not now" says when to retry
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[1] is exc]
    assert len(logged) == (code == grpc.StatusCode.INTERNAL)  # a bug's traceback is in the log


def test_a_stream_message_that_is_not_protobuf_is_invalid_argument():
    async def stream(self, request_iterator, context):
        raise DecodeError("Error parsing message")
        yield

    async def scenario():
        return [item async for item in map_errors(stream)(None, None, FakeContext())]

    with pytest.raises(Aborted) as info:
        run(scenario())
    assert info.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT and info.value.args[1].startswith("request: ")


def test_a_handler_that_aborts_itself_keeps_its_status():
    class Abort(grpc.aio.AbortError):
        pass

    @map_errors
    async def handler(request, context):
        raise Abort("UNAUTHENTICATED already sent")

    with pytest.raises(Abort):
        run(handler(None, FakeContext()))
    with pytest.raises(TypeError):
        map_errors(lambda request, context: None)


def test_the_table_has_one_row_per_kind_and_the_first_match_wins():
    assert kind_of(UnknownModel("unknown model 'x'")).openai_code == "model_not_found"
    assert kind_of(FieldError("top_p", "must be in (0, 1]")).http_status == 400
    assert kind_of(ResourceExhausted("queue full")).retry_after_s == 1
    assert kind_of(PeerUnavailable("no decode instance")).http_status == 503
    assert kind_of(KeyError("bug")).grpc_code == grpc.StatusCode.INTERNAL

