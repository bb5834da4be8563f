"""The OpenAI-compatible HTTP API (aiohttp): /v1/completions, /v1/chat/completions (JSON or SSE),
/v1/models, plus /metrics and /health. A thin layer: JSON in, the core, JSON or SSE out.

Errors before the first token are plain HTTP errors in OpenAI's shape; once a stream has begun, an
error is sent as one ``data: {"error": ...}`` event and the stream ends.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import prometheus_client
from aiohttp import web

from cloudmatrix.errors import FieldError
from services.gateway import chat as chat_template
from services.gateway import openai_schema as oai
from services.gateway.core import GatewayCore
from services.gateway.errors import error_body, error_response, http_error_response
from services.gateway.schema import Delta, Finish, GenerateRequest, Prepared

log = logging.getLogger(__name__)


class OpenAIHttp:
    def __init__(self, core: GatewayCore, api_keys: tuple[str, ...]) -> None:
        self.core, self.api_keys, self.created = core, api_keys, int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return http_error_response(exc, request.method, request.path)
        except Exception as exc:  # noqa: BLE001 - answered in OpenAI's shape; unexpected ones are logged
            return error_response(exc)

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if self.api_keys and request.path.startswith("/v1/") and not self._authorized(request):
            return web.json_response(status=401, data={"error": {
                "message": "missing or incorrect API key: send `Authorization: Bearer <key>`",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(key.strip(), k) for k in self.api_keys)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.core.model.id, "object": "model", "created": self.created,
                "owned_by": "cloudmatrix-infer", "max_model_len": self.core.model.context_limit,
                "trained": self.core.model.trained}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id} (the openai client's ``models.retrieve``)."""
        name = request.match_info["model"]
        if name != self.core.model.id:
            return web.json_response(status=404, data={"error": {
                "message": f"model {name!r} does not exist; this server serves {self.core.model.id!r}",
                "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
        return web.json_response(self._model_card())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=prometheus_client.generate_latest(),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def health(self, request: web.Request) -> web.Response:
        """200 while at least one prefill and one decode instance answer; 503 otherwise, so a
        load balancer stops sending requests here."""
        prefill, decode = await self.core.prefill.reachable(), await self.core.decode.reachable()
        ok = bool(prefill and decode)
        return web.json_response({"status": "ok" if ok else "unavailable", "prefill_instances": len(prefill),
                                  "decode_instances": len(decode)}, status=200 if ok else 503)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _parse(self, request: web.Request, chat: bool) -> tuple[dict[str, Any], Prepared]:
        """The body and the prepared request; a malformed one (400, 413) is counted as "invalid"."""
        try:
            body = await _json_body(request)
            if chat:
                ids = self.core.tokenizer.encode(chat_template.render(body.get("messages")), add_bos=False)
                req = oai.generate_request(body, uuid.uuid4().hex, True, ids)
            else:
                req = oai.generate_request(body, uuid.uuid4().hex, False, oai.prompt(body))
            return body, _renamed(self.core.prepare, req, chat)
        except (FieldError, web.HTTPRequestEntityTooLarge):
            self.core.metrics.observe_invalid()
            raise

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body, prepared = await self._parse(request, chat)
        stream, include_usage = oai.stream_flags(body)
        shape = oai.Shape(chat, prepared.request_id, prepared.model, int(time.time()))
        async with contextlib.aclosing(self.core.generate(prepared)) as events:
            first = await anext(events)  # admission, prefill: failures so far are plain HTTP errors
            if not stream:
                return await _whole(shape, first, events)
            return await _stream(request, shape, first, events, include_usage)


def _renamed(prepare, req: GenerateRequest, chat: bool):
    """Chat prompts come from ``messages``: name that field in errors about the prompt."""
    try:
        return prepare(req)
    except FieldError as err:
        if chat and err.field == "prompt":
            raise FieldError("messages", str(err).removeprefix("prompt: ")) from err
        raise


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except json.JSONDecodeError as err:
        raise FieldError("body", f"not valid JSON ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise FieldError("body", f"not UTF-8 ({err.reason} at byte {err.start})") from err
    if not isinstance(body, dict):
        raise FieldError("body", "expected a JSON object")  # noqa: TRY004 - bad input: 400
    return body


async def _whole(shape: oai.Shape, first: Delta, events: AsyncIterator[Delta | Finish]) -> web.Response:
    text, event = first.text, first
    async for event in events:
        text += event.text
    if not isinstance(event, Finish):
        raise RuntimeError("the core's last event is not a Finish")
    return web.json_response(shape.completion(text, event))


async def _stream(request: web.Request, shape: oai.Shape, first: Delta, events: AsyncIterator[Delta | Finish],
                  include_usage: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    if shape.chat:
        await _send(response, shape.chunk("", role=True))
    try:
        await _send_events(response, shape, first, events, include_usage)
    except ConnectionResetError:
        raise  # the client left: nothing to tell it
    except Exception as exc:  # noqa: BLE001 - the status line is gone: the error travels as an event
        await _send(response, error_body(exc))
    else:
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _send_events(response: web.StreamResponse, shape: oai.Shape, first: Delta,
                       events: AsyncIterator[Delta | Finish], include_usage: bool) -> None:
    if first.text:
        await _send(response, shape.chunk(first.text))
    async for event in events:
        if event.text:
            await _send(response, shape.chunk(event.text))
        if isinstance(event, Finish):
            await _send(response, shape.chunk(None, event.reason))
            if include_usage:
                await _send(response, shape.usage_chunk(event))


async def _send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")
