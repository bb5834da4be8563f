"""OpenTelemetry tracing: a provider per process, spans to OTLP or to a JSON-lines file.

Context crosses processes in gRPC metadata as W3C ``traceparent`` (OpenTelemetry's default global
propagator); ``instrument_grpc`` makes every ``grpc.aio`` server and channel carry it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import (
    GrpcAioInstrumentorClient,
    GrpcAioInstrumentorServer,
    filters,
)
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)


def setup_tracing(
    service_name: str,
    *,
    instance_id: str | None = None,
    otlp_endpoint: str | None = None,
    span_file: str | None = None,
    set_global: bool = True,
) -> TracerProvider:
    """A TracerProvider exporting through a BatchSpanProcessor: to the OTLP gRPC collector at
    ``otlp_endpoint`` when given, else as JSON lines to ``span_file`` when given, else nowhere.

    The resource follows OpenTelemetry's semantic conventions: ``service.name`` is the service
    (``gateway``, ``npu_emulator``, ...), ``service.instance.id`` the process (``gateway-0``).

    ``provider.shutdown()`` flushes pending spans (it also runs at interpreter exit). With
    ``set_global`` the provider becomes OpenTelemetry's global one, which can be set once per
    process; tests pass ``set_global=False`` and hand the provider around explicitly.
    """
    attributes = {SERVICE_NAME: service_name} | ({SERVICE_INSTANCE_ID: instance_id} if instance_id else {})
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = _make_exporter(otlp_endpoint, span_file)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def _make_exporter(otlp_endpoint: str | None, span_file: str | None) -> SpanExporter | None:
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        return OTLPSpanExporter(endpoint=otlp_endpoint, insecure=not otlp_endpoint.startswith("https://"))
    if span_file:
        return JsonLinesSpanExporter(span_file)
    return None


FABRIC_ATTACH = "/cmx.fabric.v1.UbFabric/Attach"


def instrument_grpc(tracer_provider: TracerProvider | None = None) -> None:
    """Trace every grpc.aio server and channel created from now on (idempotent).

    Server spans continue the caller's W3C trace context from the request metadata; client spans
    inject it. Health checks are not traced (probes every few seconds are noise), nor the fabric's
    Attach streams: one lives as long as its die, and the fabric traces every round it routes
    instead (its interceptor would also sit in the path of every frame).
    ``tracer_provider=None`` means the global provider.
    """
    untraced = filters.negate(filters.any_of(filters.health_check(), filters.full_method_name(FABRIC_ATTACH)))
    for instrumentor in (GrpcAioInstrumentorServer(filter_=untraced), GrpcAioInstrumentorClient(filter_=untraced)):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=tracer_provider)


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file (see ``span_record``)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown()
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans)
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as plain JSON-able data; ids are lower-case hex (32 / 16 chars)."""
    start, end = span.start_time or 0, span.end_time or 0
    return {
        "name": span.name,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
        "kind": span.kind.name,
        "start_unix_nano": start,
        "end_unix_nano": end,
        "duration_s": (end - start) / 1e9,
        "status": span.status.status_code.name,
        "status_message": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [_event_record(e) for e in span.events],
        "resource": {k: v for k in (SERVICE_NAME, SERVICE_INSTANCE_ID)
                     if (v := span.resource.attributes.get(k)) is not None},
    }


def _event_record(event: Any) -> dict[str, Any]:
    return {"name": event.name, "unix_nano": event.timestamp, "attributes": dict(event.attributes or {})}
