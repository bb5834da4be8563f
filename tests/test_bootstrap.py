"""The shared service bootstrap in-process: ServiceHost, channels, metrics, tracing, logging.

In-process tests host a real grpc.aio server on 127.0.0.1 port 0 with the OTLP TraceService as a
trivial servicer (its proto ships with OpenTelemetry), next to the built-in health and reflection
services. Tracing here never touches OpenTelemetry's global state: providers and interceptors are
passed explicitly.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import urllib.error
import urllib.request

import grpc
import pytest
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
)
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

from cloudmatrix.rpc.channel import health_check, health_check_sync, make_channel
from cloudmatrix.telemetry.logging import setup_logging
from cloudmatrix.telemetry.tracing import setup_tracing
from tests.rpc_helpers import (
    EXPORT_METHOD,
    ONE_SPAN,
    TRACE_SERVICE,
    Collector,
    fetch,
    hex_id,
    list_services,
    make_host,
    memory_tracer_provider,
    read_spans,
    run,
)

pytestmark = pytest.mark.timeout(60)


def test_health_flips_to_serving_and_reflection_lists_services(tmp_path):
    async def scenario():
        async with make_host(tmp_path) as host:
            before = (await health_check(host.address), await health_check(host.address, service=TRACE_SERVICE))
            assert not (tmp_path / "ready.json").exists()
            await host.set_serving()
            after = (await health_check(host.address), await health_check(host.address, service=TRACE_SERVICE))
            unknown = await health_check(host.address, service="no.such.Service")
            ready = json.loads((tmp_path / "ready.json").read_text())
            services = await list_services(host.address)
            sync_status = await asyncio.to_thread(health_check_sync, host.address)
        return host, before, after, unknown, ready, services, sync_status

    host, before, after, unknown, ready, services, sync_status = run(scenario())
    assert before == ("NOT_SERVING", "NOT_SERVING")
    assert after == ("SERVING", "SERVING") and sync_status == "SERVING" and unknown == "UNKNOWN"
    assert ready == {"service": "collector", "pid": os.getpid(), "host": "127.0.0.1",
                     "port": host.port, "metrics_port": host.metrics_port}
    assert host.port > 0
    assert {TRACE_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert not (tmp_path / "ready.json").exists()
    assert health_check_sync(host.address, timeout=1.0) == "UNREACHABLE"



def test_metrics_endpoint_serves_prometheus_text(tmp_path):
    async def scenario():
        async with make_host(tmp_path) as host:
            url = f"http://127.0.0.1:{host.metrics_port}/metrics"
            return url, await asyncio.to_thread(fetch, url)

    url, (content_type, body) = run(scenario())
    assert content_type.startswith("text/plain")
    assert "# TYPE python_info gauge" in body and "process_cpu_seconds_total" in body
    with pytest.raises(urllib.error.URLError):
        fetch(url)


def test_metrics_can_be_disabled(tmp_path):
    async def scenario():
        async with make_host(tmp_path, metrics_port=-1) as host:
            return host.metrics_port

    assert run(scenario()) is None


def test_server_span_continues_the_client_trace(tmp_path):
    span_file = tmp_path / "spans" / "collector.jsonl"
    server_tp = setup_tracing("collector", span_file=str(span_file), set_global=False)
    client_tp, client_spans = memory_tracer_provider()

    async def scenario():
        interceptors = [aio_server_interceptor(tracer_provider=server_tp)]
        async with make_host(tmp_path, tracer_provider=server_tp, interceptors=interceptors) as host:
            await host.set_serving()
            client = aio_client_interceptors(tracer_provider=client_tp)
            async with make_channel(host.address, interceptors=client) as channel:
                with client_tp.get_tracer("test").start_as_current_span("client-op") as root:
                    await trace_service_pb2_grpc.TraceServiceStub(channel).Export(ONE_SPAN, timeout=5)
        return root

    root = run(scenario())  # leaving the host shut server_tp down, which flushed the file
    client_span = next(s for s in client_spans.get_finished_spans() if s.name == EXPORT_METHOD)
    server_span = next(s for s in read_spans(span_file) if s["name"] == EXPORT_METHOD)
    assert client_span.parent.span_id == root.context.span_id
    assert server_span["kind"] == "SERVER" and server_span["status"] != "ERROR"
    assert server_span["trace_id"] == hex_id(root.context.trace_id, 32)
    assert server_span["parent_span_id"] == hex_id(client_span.context.span_id, 16)
    assert len(server_span["span_id"]) == 16
    assert server_span["resource"]["service.name"] == "collector"
    assert server_span["end_unix_nano"] >= server_span["start_unix_nano"] > 0


def test_otlp_exporter_delivers_to_a_collector(tmp_path):
    collector = Collector()

    async def scenario():
        async with make_host(tmp_path, collector) as host:
            provider = setup_tracing("probe", otlp_endpoint=host.address, set_global=False)
            with provider.get_tracer("test").start_as_current_span("probe-span"):
                pass
            await asyncio.to_thread(provider.shutdown)

    run(scenario())
    spans = [span for request in collector.requests for rs in request.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    assert [s.name for s in spans] == ["probe-span"]


def test_drain_finishes_in_flight_rpc_and_refuses_new_ones(tmp_path):
    collector = Collector(delay_s=0.5)

    async def scenario():
        host = make_host(tmp_path, collector, grace_s=5.0)
        await host.start()
        async with make_channel(host.address) as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            in_flight = asyncio.ensure_future(stub.Export(ONE_SPAN, timeout=5))
            await asyncio.sleep(0.2)
            host.request_stop("test")
            await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Export(ONE_SPAN, timeout=2)
            await in_flight
        await host.wait()

    run(scenario())
    assert len(collector.requests) == 1


def test_a_field_error_becomes_invalid_argument_naming_the_field(tmp_path):
    async def scenario():
        async with make_host(tmp_path) as host:
            async with make_channel(host.address) as channel:
                stub = trace_service_pb2_grpc.TraceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Export(trace_service_pb2.ExportTraceServiceRequest(), timeout=5)
        return info.value

    error = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "resource_spans: the export carries none"
    assert ("cmx-field", "resource_spans") in tuple(error.trailing_metadata())



def test_json_logging_carries_fields_and_trace_ids():
    stream = io.StringIO()
    root = logging.getLogger()
    old_level = root.level
    handler = setup_logging("npu", "INFO", "json", stream=stream)
    provider, _ = memory_tracer_provider()
    try:
        with provider.get_tracer("test").start_as_current_span("step") as span:
            logging.getLogger("cmx.test").info("step done", extra={"die": 3})
        logging.getLogger("cmx.test").debug("hidden")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert {k: line[k] for k in ("level", "service", "logger", "msg", "die")} == {
        "level": "INFO", "service": "npu", "logger": "cmx.test", "msg": "step done", "die": 3}
    assert line["trace_id"] == hex_id(span.get_span_context().trace_id, 32)
    assert line["span_id"] == hex_id(span.get_span_context().span_id, 16)
    assert line["ts"].endswith("+00:00")


