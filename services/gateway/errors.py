"""Exceptions -> OpenAI's error JSON ``{"error": {message, type, param, code}}``, HTTP statuses
and ``Retry-After``, by the project's one table (cloudmatrix/rpc/errors.py): 400 bad input (the
FieldError's field is the param), 429 over capacity, 503 an instance unavailable, 504 deadline,
500 a bug (logged; its message says nothing of it)."""
from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.errors import INTERNAL, kind_of

log = logging.getLogger(__name__)


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, code) from the one table (cloudmatrix/rpc/errors.py); an
    error of none of its kinds is a bug: logged with its traceback."""
    kind = kind_of(exc)
    if kind is INTERNAL:
        log.error("request failed", exc_info=exc)
    return kind.http_status, kind.openai_type, kind.openai_code


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


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
    retry = kind_of(exc).retry_after_s
    return web.json_response(body, status=status, headers={"Retry-After": str(retry)} if retry else None)


def _described(exc: BaseException) -> tuple[int, dict[str, Any]]:
    status, type_, code = classify(exc)
    message = ("internal error (the gateway logged it)" if status == 500
               else " ".join(str(exc).split()) or type(exc).__name__)
    param = exc.field if isinstance(exc, FieldError) else None
    return status, {"error": {"message": message, "type": type_, "param": param, "code": code}}
