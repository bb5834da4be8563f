"""Raw gRPC bidirectional-stream ping-pong on loopback: the floor under every fabric round here."""
from __future__ import annotations

import queue
import statistics
import time
from concurrent import futures

import grpc

_METHOD = "/cmx.bench.Echo/Stream"


def _echo(request_iterator, context):
    yield from request_iterator


def grpc_pingpong_s(count: int, payload: bytes = b"x" * 64) -> float:
    """Median round-trip seconds of one small message over one bidi stream (sync gRPC, loopback)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler("cmx.bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return _measure(channel.stream_stream(_METHOD), count, payload)
    finally:
        server.stop(grace=None)


def _measure(stub, count: int, payload: bytes) -> float:
    outbox: queue.Queue = queue.Queue()
    done = object()
    responses = stub(iter(outbox.get, done))
    samples = []
    for _ in range(count + 5):
        start = time.perf_counter()
        outbox.put(payload)
        next(responses)
        samples.append(time.perf_counter() - start)
    outbox.put(done)
    return statistics.median(samples[5:])
