"""A bare gRPC server for raw streaming throughput: client-stream sink and server-stream source of
opaque bytes (no protobuf schema, no service logic). Run as a separate process by the benchmark:
``python -m cloudmatrix.bench.sink PORT_FILE``."""
from __future__ import annotations

import sys
from concurrent import futures
from pathlib import Path

import grpc

SERVICE = "cmx.bench.Raw"
MAX_MESSAGE = 64 * 2**20


def _sink(request_iterator, context):
    total = sum(len(chunk) for chunk in request_iterator)
    return total.to_bytes(8, "little")


def _source(request, context):
    size, count = int.from_bytes(request[:8], "little"), int.from_bytes(request[8:16], "little")
    chunk = b"\x5a" * size
    for _ in range(count):
        yield chunk


def serve(port_file: str) -> None:
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Sink": grpc.stream_unary_rpc_method_handler(_sink),
        "Source": grpc.unary_stream_rpc_method_handler(_source),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


if __name__ == "__main__":
    serve(sys.argv[1])
