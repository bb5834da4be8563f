"""Structured logging: one JSON object per line (or plain text) carrying the active trace ids.

A JSON line has ``ts, level, service, logger, msg``, then any ``extra={...}`` fields of the call,
then ``trace_id``/``span_id`` (32/16 hex chars) when a span is active, and ``exc`` for exceptions.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from opentelemetry import trace

_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class _ServiceHandler(logging.StreamHandler):
    """The handler setup_logging installs; marked by type so a second call replaces it."""


def setup_logging(service: str, level: str = "INFO", fmt: str = "json",
                  stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger to ``stream`` (stderr) as JSON lines or text; idempotent."""
    formatters = {"json": JsonFormatter, "text": TextFormatter}
    if fmt not in formatters:
        raise ValueError(f"log format must be one of {sorted(formatters)}, got {fmt!r}")
    handler = _ServiceHandler(stream or sys.stderr)
    handler.setFormatter(formatters[fmt](service))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ServiceHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra={...}`` fields a logging call attached to ``record``."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def active_trace_ids() -> dict[str, str]:
    """``{"trace_id", "span_id"}`` of the current span, or {} outside any span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, tz=timezone.utc).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, service: str):
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in {**record_extras(record), **active_trace_ids()}.items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``ts LEVEL service logger: msg key=value ...`` for humans at a terminal."""

    def __init__(self, service: str):
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        fields = {**record_extras(record), **active_trace_ids()}
        tail = "".join(f" {k}={v}" for k, v in fields.items())
        text = (f"{_timestamp(record.created)} {record.levelname:<7} {self._service} "
                f"{record.name}: {record.getMessage()}{tail}")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text
