"""Carrying trace context where gRPC metadata does not: inside fabric frames, and from the
requests a batched step serves to the step itself."""
from __future__ import annotations

from opentelemetry import context, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" when nothing is being traced)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str) -> context.Context | None:
    return _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None


def span_link(ctx: context.Context) -> trace.Link | None:
    span_context = trace.get_current_span(ctx).get_span_context()
    return trace.Link(span_context) if span_context.is_valid else None
