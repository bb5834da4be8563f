"""The OpenAI-compatible HTTP API (aiohttp): /v1/completions, /v1/chat/completions (JSON or SSE),
/v1/models, plus /metrics and /health. A thin layer: JSON in, the core, JSON or SSE out.

Errors before the first token are plain HTTP errors in OpenAI's shape; once a stream has begun, an
error is sent as one ``data: {"error": ...}`` event and the stream ends.
"""
from __future__ import annotations

import asyncio
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
from services.gateway.openai_choices import Choice, LogprobsJson
from services.gateway.schema import Delta, Finish, GenerateRequest, Timing, Usage

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

    async def _parse(self, request: web.Request,
                     chat: bool) -> tuple[dict[str, Any], str, oai.Options, list[Choice]]:
        """The body, the response's id, its options, and a choice per prepared request; a malformed
        one (400, 413) is counted as "invalid"."""
        try:
            body = await _json_body(request)
            opts = oai.options(body, chat)
            if chat:
                prompts = [self.core.tokenizer.encode(chat_template.render(body.get("messages")), add_bos=False)]
            else:
                prompts = oai.prompts(body)
            response_id = uuid.uuid4().hex
            requests = oai.generate_requests(body, response_id, chat, prompts, opts)
            prepared = [_renamed(self.core.prepare, r, chat) for r in requests]
        except (FieldError, web.HTTPRequestEntityTooLarge):
            self.core.metrics.observe_invalid()
            raise
        echoes = [self._echo_text(value) if opts.echo else None for value in prompts for _ in range(opts.n)]
        return body, response_id, opts, [Choice(i, i // opts.n, p, echo) for i, (p, echo) in enumerate(zip(prepared, echoes))]

    def _echo_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.core.tokenizer.decode(prompt)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body, response_id, opts, choices = await self._parse(request, chat)
        stream, include_usage = oai.stream_flags(body)
        shape = oai.Shape(chat, response_id, choices[0].prepared.model, int(time.time()))
        logprobs = LogprobsJson(self.core.tokenizer, chat) if opts.top is not None else None
        async with _Choices(self.core, choices) as events:
            await events.started()  # admission, prefill: failures so far are plain HTTP errors
            if not stream:
                return await _whole(shape, events, logprobs)
            return await _stream(request, shape, events, include_usage, logprobs)


class _Choices:
    """Each choice's generation in a task of its own (the core's generator, with its trace span,
    lives in one task from start to end), their events merged in arrival order."""

    def __init__(self, core: GatewayCore, choices: list[Choice]) -> None:
        self.core, self.choices = core, choices
        self._queue: asyncio.Queue = asyncio.Queue()
        self._early: list[tuple[int, Delta | Finish]] = []
        self._open = len(choices)

    async def __aenter__(self) -> _Choices:
        self._tasks = [asyncio.create_task(self._pump(c)) for c in self.choices]
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pump(self, choice: Choice) -> None:
        try:
            event = None
            async with contextlib.aclosing(self.core.generate(choice.prepared)) as events:
                async for event in events:
                    await self._queue.put((choice.index, event))
            if not isinstance(event, Finish):
                raise RuntimeError("the core's last event is not a Finish")
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await self._queue.put((choice.index, exc))

    async def _next(self) -> tuple[int, Delta | Finish]:
        index, item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        self._open -= isinstance(item, Finish)
        return index, item

    async def started(self) -> None:
        """Wait until every choice has its first event (raising the first failure)."""
        seen: set[int] = set()
        while len(seen) < len(self.choices):
            index, event = await self._next()
            seen.add(index)
            self._early.append((index, event))

    async def __aiter__(self) -> AsyncIterator[tuple[Choice, Delta | Finish]]:
        """(choice, event) until every choice has finished."""
        for index, event in self._early:
            yield self.choices[index], event
        self._early = []
        while self._open:
            index, event = await self._next()
            yield self.choices[index], event


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


async def _whole(shape: oai.Shape, events: _Choices, logprobs: LogprobsJson | None) -> web.Response:
    async for choice, event in events:
        choice.add(event)
    choices = events.choices
    rows = [(c.text, logprobs.of(c.entries) if logprobs else None, c.finish) for c in choices]
    return web.json_response(shape.completion(rows, *_totals(choices)))


def _totals(choices: list[Choice]) -> tuple[Usage, Timing]:
    """Usage of all choices (a prompt counted once however many choices it has: they share its
    prompt_index) and the first choice's timing."""
    prompts = {c.prompt_index: c.finish.usage for c in choices}.values()
    usage = Usage(sum(u.prompt_tokens for u in prompts), sum(c.finish.usage.completion_tokens for c in choices),
                  sum(u.cached_tokens for u in prompts))
    return usage, choices[0].finish.timing


async def _stream(request: web.Request, shape: oai.Shape, events: _Choices, include_usage: bool,
                  logprobs: LogprobsJson | None) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    if shape.chat:
        for choice in events.choices:
            await _send(response, shape.chunk("", role=True, index=choice.index))
    try:
        async for choice, event in events:  # every choice's events as they come, each chunk naming its choice
            await _send_event(response, shape, choice, event, logprobs)
        if include_usage:
            await _send(response, shape.usage_chunk(*_totals(events.choices)))
    except ConnectionResetError:
        raise  # the client left: nothing to tell it
    except Exception as exc:  # noqa: BLE001 - the status line is gone: the error travels as an event
        await _send(response, error_body(exc))
    else:
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _send_event(response: web.StreamResponse, shape: oai.Shape, choice: Choice, event: Delta | Finish,
                      logprobs: LogprobsJson | None) -> None:
    offset = len(choice.text)
    text, entries = choice.add(event)
    if text or entries:
        await _send(response, shape.chunk(text, index=choice.index,
                                          logprobs=logprobs.of(entries, offset) if logprobs and entries else None))
    if isinstance(event, Finish):
        await _send(response, shape.chunk(None, event.reason, index=choice.index))


async def _send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")
