"""Shared helpers for the bootstrap tests: a trivial servicer, span readers, small clients."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cloudmatrix.config import ServerConfig
from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.channel import make_channel
from cloudmatrix.rpc.errors import map_errors
from cloudmatrix.rpc.server import ServiceHost

TRACE_SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
EXPORT_METHOD = f"/{TRACE_SERVICE}/Export"
ONE_SPAN = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans()])


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A trivial servicer: records OTLP exports; rejects empty ones; may take its time."""

    def __init__(self, delay_s: float = 0.0):
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.delay_s = delay_s

    @map_errors
    async def Export(self, request, context):
        if not request.resource_spans:
            raise FieldError("resource_spans", "the export carries none")
        await asyncio.sleep(self.delay_s)
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def run(coro, timeout_s: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def make_host(tmp_path: Path, collector: Collector | None = None, **kwargs) -> ServiceHost:
    config = ServerConfig(grace_s=kwargs.pop("grace_s", 2.0), ready_file=str(tmp_path / "ready.json"),
                          metrics_port=kwargs.pop("metrics_port", 0))
    registration = (trace_service_pb2_grpc.add_TraceServiceServicer_to_server,
                    collector or Collector(), TRACE_SERVICE)
    return ServiceHost(config, [registration], service="collector", **kwargs)


async def list_services(target: str) -> set[str]:
    async with make_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
            return {s.name for s in reply.list_services_response.service}
    return set()


def memory_tracer_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def read_spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")



def fetch(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()

