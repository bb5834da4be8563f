"""The gateway, free of gRPC and HTTP: tokenize and validate, admit, pick the least-loaded prefill
and decode instances, run prefill then decode, and stream text deltas cut at stop strings.

One root span "gateway.generate" per request; the outbound calls run inside it, so the prefill,
decode and die spans join the same trace. Timing phases: queue (admission wait), prefill, decode;
measured wall seconds and modeled CloudMatrix384 seconds kept apart.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from opentelemetry import trace

from cloudmatrix.errors import FieldError, UnknownModel
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.rpc.errors import PeerUnavailable, ResourceExhausted
from cloudmatrix.sampling_params import FinishReason, StopRule, TokenLogprobs
from services.gateway.admission import Admission
from services.gateway.backend import GrpcBackend
from services.gateway.metrics import GatewayMetrics
from services.gateway.picker import InstancePicker
from services.gateway.schema import (
    Delta,
    Finish,
    GenerateRequest,
    PrefillOutcome,
    Prepared,
    Timing,
    Usage,
)
from services.gateway.text import OutputText

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
CANCEL_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    id: str
    context_limit: int                   # max_position_embeddings: prompt + completion tokens
    vocab_size: int
    eos_token_id: int
    trained: bool = False                # the checkpoint came from `cmx train` (it has a train.json)


@dataclasses.dataclass
class _Run:
    """One request's state while it streams."""

    prepared: Prepared
    text: OutputText
    start: float
    deadline: float
    measured: dict[str, float] = dataclasses.field(default_factory=dict)
    modeled: dict[str, float] = dataclasses.field(default_factory=dict)
    completion_tokens: int = 0
    cached_tokens: int = 0
    last_token_at: float = 0.0
    reason: FinishReason | None = None
    generated: list[int] = dataclasses.field(default_factory=list)  # accepted completion tokens
    migrations: int = 0

    def remaining(self) -> float:
        left = self.deadline - time.perf_counter()
        if left <= 0:
            raise TimeoutError(f"request {self.prepared.request_id} passed its deadline")
        return left


class GatewayCore:
    def __init__(self, model: ModelInfo, tokenizer: TextTokenizer, backend: GrpcBackend,
                 prefill: InstancePicker, decode: InstancePicker, admission: Admission, timeout_s: float) -> None:
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.prefill, self.decode, self.admission, self.timeout_s = prefill, decode, admission, timeout_s
        self.metrics = GatewayMetrics(model.id)
        self.metrics.track_admission(admission)

    def prepare(self, req: GenerateRequest) -> Prepared:
        """Tokenize and validate; ValueError names the field to change."""
        if req.model and req.model != self.model.id:
            raise UnknownModel(f"unknown model {req.model!r}; this gateway serves {self.model.id!r}")
        ids = self._token_ids(req.prompt)
        limit, wanted = self.model.context_limit, req.sampling.max_tokens
        if len(ids) >= limit:
            raise FieldError("prompt", f"{len(ids)} tokens do not fit the model's context of {limit} tokens "
                             f"(at least one completion token must fit)")
        if len(ids) + wanted > limit:
            raise FieldError("max_tokens", f"the prompt's {len(ids)} tokens plus max_tokens {wanted} exceed the "
                             f"model's context of {limit} tokens; ask for at most {limit - len(ids)}")
        return Prepared(req.request_id or uuid.uuid4().hex, self.model.id, ids, req.sampling, req.prompt_only)

    def _token_ids(self, prompt: str | list[int]) -> list[int]:
        if not prompt:
            raise FieldError("prompt", "is empty")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.model.vocab_size for t in prompt):
            raise FieldError("prompt", f"token ids must be integers in [0, {self.model.vocab_size})")
        return list(prompt)

    async def generate(self, p: Prepared) -> AsyncIterator[Delta | Finish]:
        """Text deltas, then one Finish. The first Delta (the prefill's token) marks the first token."""
        start = time.perf_counter()
        run = _Run(p, OutputText(self.tokenizer, p.sampling.stop), start, start + self.timeout_s)
        attributes = {"request_id": p.request_id, "model": p.model, "prompt_tokens": len(p.token_ids)}
        with tracer.start_as_current_span("gateway.generate", attributes=attributes) as span:
            try:
                async with self.admission.slot(run.remaining()):
                    run.measured["queue"] = time.perf_counter() - start
                    async for event in self._serve(run):
                        yield event
            except Exception as exc:
                run.reason = _error_kind(exc)
                raise
            finally:  # a request whose client left ends here with no reason: "cancelled"
                span.set_attributes({"completion_tokens": run.completion_tokens, "cached_tokens": run.cached_tokens})
                self.metrics.observe_finish(run.reason or FinishReason.CANCELLED, time.perf_counter() - start,
                                            run.completion_tokens)

    async def _serve(self, run: _Run) -> AsyncIterator[Delta | Finish]:
        async with aclosing(self._prefill(run)) as stages:
            first = await anext(stages, None)
            if first is None:
                raise PeerUnavailable("the prefill ended before its first token")
            if run.prepared.prompt_only:  # echo with max_tokens 0: the prompt's log-probabilities alone
                run.reason = FinishReason.LENGTH
                yield Delta("", [], prompt_logprobs=first.prompt_logprobs)
            else:
                yield dataclasses.replace(self._accept(run, [first.first_token], _listed(first.logprobs)),
                                          prompt_logprobs=first.prompt_logprobs)
                run.reason = self._first_token_reason(run, first.first_token)
            handoff = await self._handoff(run, stages)
        if run.reason is None:
            async for delta in self._decode(run, handoff):
                yield delta
        yield self._finish(run)

    async def _prefill(self, run: _Run) -> AsyncIterator[PrefillOutcome]:
        """The request's prefill: its first token, then the outcome with the KV handle."""
        p = run.prepared
        started = time.perf_counter()
        async with aclosing(self._prefill_anywhere(p, run)) as stages:
            async for outcome in stages:
                if outcome.kv is None:  # the first token, ahead of the prompt's KV in the pool
                    run.last_token_at = time.perf_counter()
                    run.cached_tokens = outcome.cached_tokens
                    self.metrics.observe_first_token(run.last_token_at - run.start, run.measured["queue"], outcome,
                                                     len(p.token_ids))
                else:
                    # modeled: the cached prefix's pool transfer apart from the rest of the prefill
                    run.modeled["cache_load"] = outcome.modeled.get("cache_load", 0.0)
                    run.measured["prefill"] = time.perf_counter() - started
                    run.modeled["prefill"] = outcome.modeled_s - run.modeled["cache_load"]
                yield outcome

    async def _handoff(self, run: _Run, stages: AsyncIterator[PrefillOutcome]) -> PrefillOutcome | None:
        """The prefill's outcome once the prompt's KV is in the pool; None when the instance was
        lost after its first token (a decode then starts from a migration: ``_decode``)."""
        try:
            outcome = await anext(stages, None)
        except PeerUnavailable as err:
            outcome = None
            log.warning("prefill instance lost after the first token", extra={"request_id": run.prepared.request_id,
                                                                             "error": str(err)})
        return outcome

    async def _prefill_anywhere(self, p: Prepared, run: _Run) -> AsyncIterator[PrefillOutcome]:
        """Prefill ``p`` on a picked instance: its first token, then the outcome with the KV handle.
        An instance unavailable before its first token is left out and another tried; one lost
        after it raises PeerUnavailable (the token was shown: the caller continues from it)."""
        tried: set[str] = set()
        while True:
            address = await self.prefill.pick(frozenset(tried))
            answered = False
            try:
                with self.prefill.using(address):
                    async with aclosing(self.backend.prefill(address, p, run.remaining())) as stream:
                        async for outcome in stream:
                            answered = True
                            yield outcome
                return
            except PeerUnavailable:
                if answered:
                    self.prefill.mark_down(address)
                    raise
                tried.add(address)
                if not await self._other_instance(self.prefill, address, tried):
                    raise

    @staticmethod
    async def _other_instance(picker: InstancePicker, failed: str, tried: set[str]) -> bool:
        """After ``failed`` answered UNAVAILABLE: is another untried instance reachable?"""
        picker.mark_down(failed)
        log.warning("instance unavailable; trying another", extra={"kind": picker.kind, "address": failed})
        return any(a not in tried for a in await picker.reachable())

    def _first_token_reason(self, run: _Run, token: int, request: Prepared | None = None) -> FinishReason | None:
        """Finished on a prefill's token (the request's, or a migration's): no decode call then."""
        request = request or run.prepared
        if run.text.stopped:
            return FinishReason.STOP
        rule = StopRule.of(request.sampling, self.model.eos_token_id, self.model.context_limit)
        return rule.reason(token, 1, len(request.token_ids) + 1)

    async def _decode(self, run: _Run, first: PrefillOutcome) -> AsyncIterator[Delta]:
        """Stream the decode to its end: after its finished chunk, or after the chunk that answers our
        Cancel at a stop string. Leaving early (the client left, an error) drops the call instead.

        A decode instance that is unavailable before it sent anything is left out and another one
        (if any) decodes: the KV is in the pool, any instance can adopt it. One that fails mid-stream
        is left out too and the request migrates (``_migrate``): the prompt plus the tokens already
        streamed are prefilled again (the prompt's blocks come from the context cache) and another
        instance continues, so the client sees every token once. So does a request whose prefill
        instance was lost after its first token (``first`` None), before any decode."""
        started, run.modeled["decode"], tried = time.perf_counter(), 0.0, set()
        backend = (run.prepared, first) if first is not None else None
        while True:
            if backend is None:  # the tokens so far are streamed; another prefill continues from them
                backend = await self._migrate(run)
                yield self._accept(run, [backend[1].first_token], _listed(backend[1].logprobs))
                run.reason = self._first_token_reason(run, backend[1].first_token, backend[0])
                if run.reason is not None:
                    break
            address = await self.decode.pick(frozenset(tried))
            progress = run.completion_tokens
            try:
                async for delta in self._decode_on(address, run, *backend):
                    yield delta
                break
            except PeerUnavailable:
                tried.add(address)
                if not await self._other_instance(self.decode, address, tried):
                    raise
                if run.completion_tokens != progress:
                    backend = None
        run.measured["decode"] = time.perf_counter() - started
        if run.reason is None:
            raise PeerUnavailable("the decode stream ended before the request finished")

    async def _migrate(self, run: _Run) -> tuple[Prepared, PrefillOutcome]:
        """The request as a new backend request: the prompt and every token streamed so far, for
        the tokens still to come; its prefill's token is the next one."""
        run.migrations += 1
        p, s = run.prepared, run.prepared.sampling
        continuation = Prepared(f"{p.request_id}-m{run.migrations}", p.model, p.token_ids + run.generated,
                                dataclasses.replace(s, max_tokens=s.max_tokens - len(run.generated),
                                                    prompt_logprobs=None))
        log.warning("instance lost mid-stream; migrating the request",
                    extra={"request_id": p.request_id, "streamed_tokens": len(run.generated)})
        trace.get_current_span().add_event("migrated", {"streamed_tokens": len(run.generated)})
        self.metrics.migrations.inc()
        outcome = None
        async with aclosing(self._prefill_anywhere(continuation, run)) as stages:
            async for outcome in stages:
                pass
        if outcome is None or outcome.kv is None:
            raise PeerUnavailable("the prefill ended before the prompt's KV was in the pool")
        return continuation, outcome

    async def _decode_on(self, address: str, run: _Run, request: Prepared,
                         first: PrefillOutcome) -> AsyncIterator[Delta]:
        with self.decode.using(address):
            stream = self.backend.decode(address, request, first, run.remaining())
            try:
                async for step in stream:
                    run.modeled["decode"] += step.modeled_s
                    if step.token_ids and not run.text.stopped:
                        yield self._accept(run, step.token_ids, step.logprobs)
                    if run.reason is None and run.text.stopped:
                        run.reason = FinishReason.STOP
                        if step.finish_reason is None and not await self._cancel(address, request.request_id):
                            break
                    elif run.reason is None:
                        run.reason = step.finish_reason
            finally:
                await stream.close()  # a no-op once the stream ended; else the decode frees the blocks

    async def _cancel(self, address: str, request_id: str) -> bool:
        """Ask the decode to stop at a stop string; False when the Cancel failed (the caller then
        drops the stream, which frees the request's blocks as well)."""
        try:
            return await self.backend.cancel(address, request_id, CANCEL_TIMEOUT_S)
        except (PeerUnavailable, TimeoutError) as err:
            log.warning("decode Cancel failed; dropping the stream instead",
                        extra={"request_id": request_id, "address": address, "error": str(err)})
            return False

    def _accept(self, run: _Run, token_ids: list[int], logprobs: list[TokenLogprobs]) -> Delta:
        now = time.perf_counter()
        if run.completion_tokens:  # tokens of one chunk share its gap evenly
            for _ in token_ids:
                self.metrics.itl.observe((now - run.last_token_at) / len(token_ids))
        run.last_token_at = now
        accepted, text = [], ""
        for token in token_ids:
            if run.text.stopped:
                break
            accepted.append(token)
            text += run.text.push(token)
        run.completion_tokens += len(accepted)
        run.generated += accepted
        self.metrics.observe_tokens(len(accepted))
        return Delta(text, accepted, list(logprobs[:len(accepted)]))

    def _finish(self, run: _Run) -> Finish:
        usage = Usage(len(run.prepared.token_ids), run.completion_tokens, run.cached_tokens)
        timing = Timing(dict(run.measured), dict(run.modeled))
        return Finish(run.reason, usage, timing, run.text.flush())


def _listed(logprobs: TokenLogprobs | None) -> list[TokenLogprobs]:
    return [logprobs] if logprobs is not None else []


def _error_kind(exc: Exception) -> str:
    """The ``cmx_requests_total`` outcome of a request that failed with ``exc``."""
    if isinstance(exc, ResourceExhausted):
        return "rejected"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, PeerUnavailable):
        return "unavailable"
    return "error"
