"""Exceptions -> OpenAI's error JSON ``{"error": {message, type, param, code}}`` and HTTP statuses:
400 bad input (the param named), 429 over capacity, 503 an instance unavailable (both with
``Retry-After``), 504 deadline."""
from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import web

from cloudmatrix.rpc.errors import PeerUnavailable, ResourceExhausted
from services.gateway.core import UnknownModel

log = logging.getLogger(__name__)
_PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*):\s")

# (exception, HTTP status, type, code); the first match wins
_KINDS = (
    (UnknownModel, 400, "invalid_request_error", "model_not_found"),
    (ValueError, 400, "invalid_request_error", "invalid_value"),
    (ResourceExhausted, 429, "rate_limit_error", "rate_limit_exceeded"),
    (PeerUnavailable, 503, "service_unavailable", "instance_unavailable"),
    (TimeoutError, 504, "timeout_error", "deadline_exceeded"),
)


def classify(exc: BaseException) -> tuple[int, str, str]:
    for kind, status, type_, code in _KINDS:
        if isinstance(exc, kind):
            return status, type_, code
    log.error("request failed", exc_info=exc)
    return 500, "internal_error", "internal_error"


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
# Seconds a client should wait before retrying: over capacity (429) or no instance reachable (503).
RETRY_AFTER_S = {429: 1, 503: 2}


def http_error_response(exc: web.HTTPException, method: str, path: str) -> web.Response:
    """An HTTP-level refusal (unknown path, wrong method, body too large, ...) in OpenAI's error
    shape instead of aiohttp's plain text; headers such as ``Allow`` are kept."""
    messages = {404: f"no such endpoint: {method} {path}",
                405: f"method {method} is not allowed on {path} (allowed: {exc.headers.get('Allow', '')})",
                413: f"request body too large: {exc.text or exc.reason}"}
    body = {"error": {"message": messages.get(exc.status, exc.text or exc.reason), "type": "invalid_request_error",
                      "param": None, "code": _HTTP_CODES.get(exc.status, exc.reason.lower().replace(" ", "_"))}}
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    return web.json_response(body, status=exc.status, headers=headers)


def error_body(exc: BaseException) -> dict[str, Any]:
    return _described(exc)[1]


def error_response(exc: BaseException) -> web.Response:
    status, body = _described(exc)
    retry = RETRY_AFTER_S.get(status)
    return web.json_response(body, status=status, headers={"Retry-After": str(retry)} if retry else None)


def _described(exc: BaseException) -> tuple[int, dict[str, Any]]:
    status, type_, code = classify(exc)
    message = " ".join(str(exc).split()) or type(exc).__name__
    match = _PARAM.match(message) if status == 400 else None
    return status, {"error": {"message": message, "type": type_, "param": match.group(1) if match else None,
                              "code": code}}
