"""A bare gRPC server for raw streaming throughput: client-stream sink and server-stream source of
opaque bytes (no protobuf schema, no service logic). Run as a separate process by the benchmark:
``python -m cloudmatrix.bench.sink PORT_FILE [threads|aio]``: ``threads`` is grpcio's thread-pool
server, ``aio`` the asyncio server every service of this project runs on."""
from __future__ import annotations

import asyncio
import sys
from concurrent import futures
from pathlib import Path

import grpc

from cloudmatrix.rpc.channel import server_options

SERVICE = "cmx.bench.Raw"
MAX_MESSAGE = 64 * 2**20
OPTIONS = server_options(MAX_MESSAGE)  # the suite's servers' own: message limits and keepalive policy


def _chunks(request: bytes) -> tuple[bytes, int]:
    size, count = int.from_bytes(request[:8], "little"), int.from_bytes(request[8:16], "little")
    return b"\x5a" * size, count


def _sink(request_iterator, context):
    return sum(len(chunk) for chunk in request_iterator).to_bytes(8, "little")


def _source(request, context):
    chunk, count = _chunks(request)
    for _ in range(count):
        yield chunk


async def _aio_sink(request_iterator, context):
    total = 0
    async for chunk in request_iterator:
        total += len(chunk)
    return total.to_bytes(8, "little")


async def _aio_source(request, context):
    chunk, count = _chunks(request)
    for _ in range(count):
        yield chunk


def _handlers(sink, source):
    return (grpc.method_handlers_generic_handler(SERVICE, {
        "Sink": grpc.stream_unary_rpc_method_handler(sink),
        "Source": grpc.unary_stream_rpc_method_handler(source),
    }),)


def serve_threads(port_file: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers(_handlers(_sink, _source))
    Path(port_file).write_text(str(server.add_insecure_port("127.0.0.1:0")))
    server.start()
    server.wait_for_termination()


async def serve_aio(port_file: str) -> None:
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers(_handlers(_aio_sink, _aio_source))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "aio":
        asyncio.run(serve_aio(sys.argv[1]))
    else:
        serve_threads(sys.argv[1])
