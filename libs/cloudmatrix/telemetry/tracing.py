"""OpenTelemetry tracing: a provider per process, spans to OTLP and/or to rotated JSON-lines files.

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
)
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

EXPORT_DELAY_MS = 1000  # a finished span reaches its exporters within about this long


def setup_tracing(
    service_name: str,
    *,
    instance_id: str | None = None,
    otlp_endpoint: str | None = None,
    span_file: str | None = None,
    span_file_max_bytes: int = 0,
    span_file_backups: int = 1,
    set_global: bool = True,
) -> TracerProvider:
    """A TracerProvider exporting through BatchSpanProcessors: to the OTLP gRPC collector at
    ``otlp_endpoint`` and/or as JSON lines to ``span_file`` (rotated past ``span_file_max_bytes``
    when > 0, keeping ``span_file_backups`` old files), or nowhere when neither is given.

    The resource follows OpenTelemetry's semantic conventions: ``service.name`` is the service
    (``gateway``, ``npu_emulator``, ...), ``service.instance.id`` the process (``gateway-0``).

    ``provider.shutdown()`` flushes pending spans (it also runs at interpreter exit). With
    ``set_global`` the provider becomes OpenTelemetry's global one, which can be set once per
    process; tests pass ``set_global=False`` and hand the provider around explicitly.
    """
    attributes = {SERVICE_NAME: service_name} | ({SERVICE_INSTANCE_ID: instance_id} if instance_id else {})
    provider = TracerProvider(resource=Resource.create(attributes))
    if otlp_endpoint:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(otlp_endpoint),
                                                       schedule_delay_millis=EXPORT_DELAY_MS))
    if span_file:
        exporter = JsonLinesSpanExporter(span_file, max_bytes=span_file_max_bytes, backups=span_file_backups)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def _otlp_exporter(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter,
    )

    return OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))


FABRIC_ATTACH = "/cmx.fabric.v1.UbFabric/Attach"


def instrument_grpc(tracer_provider: TracerProvider | None = None) -> None:
    """Trace every grpc.aio server and channel created from now on (idempotent).

    Server spans continue the caller's W3C trace context from the request metadata; client spans
    inject it. Health checks are not traced (probes every few seconds are noise), nor the fabric's
    Attach streams: one lives as long as its die, and the fabric traces every round it routes
    instead (its interceptor would also sit in the path of every frame).
    ``tracer_provider=None`` means the global provider.
    """
    for instrumentor in (GrpcAioInstrumentorServer(filter_=traced_rpc), GrpcAioInstrumentorClient(filter_=traced_rpc)):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=tracer_provider)


HEALTH_SERVICE = "/grpc.health.v1.Health"


def traced_rpc(call_details) -> bool:
    """The interceptors' filter, run on every call: everything but health checks and the fabric's
    Attach. (opentelemetry's composable filters took 3% of the decode service's busy time.)
    Server call details carry ``method`` as str, grpc.aio client ones as bytes (grpc issue 31092)."""
    method = getattr(call_details, "method", "")
    if isinstance(method, bytes):
        method = method.decode()
    return method != FABRIC_ATTACH and not method.startswith(HEALTH_SERVICE)


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file (see ``span_record``).

    With ``max_bytes`` > 0 the file is rotated before it would grow past it: ``f`` becomes
    ``f.1``, ``f.1`` becomes ``f.2`` ... and the oldest beyond ``backups`` is deleted, so a
    process's spans take at most ``(backups + 1) * max_bytes`` on disk.
    """

    def __init__(self, path: str, *, max_bytes: int = 0, backups: int = 1):
        if max_bytes < 0 or backups < 0:
            raise ValueError(f"need max_bytes >= 0 and backups >= 0, got {max_bytes}, {backups}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown()
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans)
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            if self.max_bytes and self._file.tell() and self._file.tell() + len(lines) > self.max_bytes:
                self._rotate()
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def _rotate(self) -> None:
        self._file.close()
        for n in range(self.backups, 0, -1):
            older = f"{self.path}.{n - 1}" if n > 1 else self.path
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{n}")
        if self.backups == 0:
            os.remove(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown()

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
