"""OpenAI JSON <-> the gateway's dataclasses: request bodies of /v1/completions and
/v1/chat/completions in, completion objects and stream chunks out. ValueError names the field."""
from __future__ import annotations

import dataclasses
from typing import Any

from cloudmatrix.errors import FieldError
from cloudmatrix.sampling_params import DEFAULT_MAX_TOKENS, MAX_LOGPROBS, SamplingParams
from services.gateway.schema import Finish, GenerateRequest, Timing, Usage

# max_tokens unset: DEFAULT_MAX_TOKENS, OpenAI's default for /v1/completions; chat takes it too
# (OpenAI's chat runs to the context's end; here a request without a limit stays bounded).
DEFAULT_TEMPERATURE = 1.0    # OpenAI's default; 0 = greedy
MAX_CHOICES = 64             # choices of one request: prompts x n
_UNSET = object()


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, _UNSET)
    if value is _UNSET or value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("number" if k is float else k.__name__ for k in kinds)
        raise FieldError(name, f"expected {names}, got {value!r}")
    return value


def model_name(body: dict[str, Any]) -> str:
    model = _field(body, "model", (str,), "")
    if not model:
        raise FieldError("model", "required")
    return model


def prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """A string, a list of token ids, or a list of either (one choice each, in order)."""
    value = body.get("prompt")
    if _one_prompt(value):
        return [value]
    if isinstance(value, list) and value and all(_one_prompt(p) for p in value):
        return list(value)
    raise FieldError("prompt", "expected a string, a list of token ids, or a list of those")


def _one_prompt(value: Any) -> bool:
    return isinstance(value, str) or isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


@dataclasses.dataclass(frozen=True)
class Options:
    """What a request asks of its response beyond sampling: ``n`` choices per prompt, the prompt
    echoed (completions), and log-probabilities with ``top`` alternatives per token (None: none)."""

    n: int = 1
    echo: bool = False
    top: int | None = None
    prompt_only: bool = False      # echo with max_tokens 0: the prompt's log-probabilities alone


def options(body: dict[str, Any], chat: bool) -> Options:
    n = _field(body, "n", (int,), 1)
    if not 1 <= n <= MAX_CHOICES:
        raise FieldError("n", f"must be in [1, {MAX_CHOICES}], got {n}")
    echo = not chat and _field(body, "echo", (bool,), False)
    if chat:
        top = _field(body, "top_logprobs", (int,), None)
        if _field(body, "logprobs", (bool,), False):
            top = top or 0
        elif top:
            raise FieldError("top_logprobs", "needs logprobs: true")
    else:
        top = _field(body, "logprobs", (int,), None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise FieldError("top_logprobs" if chat else "logprobs", f"must be in [0, {MAX_LOGPROBS}], got {top}")
    zero = _field(body, "max_tokens", (int,), None) == 0
    if zero and not echo:
        raise FieldError("max_tokens", "must be >= 1 (0 only with echo: the prompt's log-probabilities alone)")
    return Options(n, echo, top, echo and zero)


def sampling(body: dict[str, Any], chat: bool, opts: Options) -> SamplingParams:
    _unsupported(body, chat)
    top_k = _field(body, "top_k", (int,), 0)
    return SamplingParams(temperature=float(_field(body, "temperature", (int, float), DEFAULT_TEMPERATURE)),
                          top_p=float(_field(body, "top_p", (int, float), 1.0)), top_k=0 if top_k == -1 else top_k,
                          seed=_field(body, "seed", (int,)),
                          max_tokens=1 if opts.prompt_only else _max_tokens(body, chat), stop=_stop(body),
                          stop_token_ids=_token_ids(body, "stop_token_ids"),
                          ignore_eos=_field(body, "ignore_eos", (bool,), False), logprobs=opts.top,
                          prompt_logprobs=opts.top if opts.echo else None)


def _max_tokens(body: dict[str, Any], chat: bool) -> int:
    """``max_tokens``, or for chat its newer name ``max_completion_tokens``."""
    default = _field(body, "max_completion_tokens", (int,), DEFAULT_MAX_TOKENS) if chat else DEFAULT_MAX_TOKENS
    return _field(body, "max_tokens", (int,), default)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list), ())
    stop = (stop,) if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise FieldError("stop", "expected a string or a list of strings")
    return tuple(stop)


def _token_ids(body: dict[str, Any], name: str) -> tuple[int, ...]:
    ids = _field(body, name, (list,), [])
    if not all(type(t) is int for t in ids):
        raise FieldError(name, "expected a list of token ids")
    return tuple(ids)


def _unsupported(body: dict[str, Any], chat: bool) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, (int, float), 0):
            raise FieldError(name, "not supported (only 0)")
    _not_implemented(body, chat)


def _not_implemented(body: dict[str, Any], chat: bool) -> None:
    """Fields of OpenAI's API this server does not implement: a request that relies on one gets
    a 400 naming it, never a silently different answer. Their neutral values are accepted."""
    for name in ("tools", "functions", "logit_bias"):
        if _field(body, name, (list, dict), None):
            raise FieldError(name, "not supported (tool and function calling, logit bias)")
    for name in ("tool_choice", "function_call"):
        if _field(body, name, (str, dict), "none") not in ("none", "auto"):
            raise FieldError(name, "not supported (no tool or function calling)")
    response_format = _field(body, "response_format", (dict,), {"type": "text"})
    if response_format.get("type", "text") != "text":
        raise FieldError("response_format", f"only {{\"type\": \"text\"}} is supported, got {response_format!r}")
    if not chat and _field(body, "best_of", (int,), 1) != 1:
        raise FieldError("best_of", "only best_of = 1 is supported")
    if not chat and _field(body, "suffix", (str,), ""):
        raise FieldError("suffix", "not supported (no insertion)")


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage in the stream)."""
    options = _field(body, "stream_options", (dict,), {})
    return _field(body, "stream", (bool,), False), bool(options.get("include_usage", False))


def generate_requests(body: dict[str, Any], request_id: str, chat: bool, prompt_values: list[str | list[int]],
                      opts: Options) -> list[GenerateRequest]:
    """One request per choice: each prompt ``n`` times (choice i of a prompt samples from seed + i
    when a seed is given, so that the choices differ and repeat)."""
    base = sampling(body, chat, opts)
    if len(prompt_values) * opts.n > MAX_CHOICES:
        raise FieldError("n", f"{len(prompt_values)} prompts x n {opts.n} is over {MAX_CHOICES} choices")
    model, many = model_name(body), len(prompt_values) * opts.n > 1
    return [GenerateRequest(f"{request_id}-{k * opts.n + i}" if many else request_id, model, value,
                            dataclasses.replace(base, seed=None if base.seed is None else (base.seed + i) % 2**64),
                            prompt_only=opts.prompt_only)
            for k, value in enumerate(prompt_values) for i in range(opts.n)]


def timing_json(timing: Timing) -> dict[str, Any]:
    """The gateway's phases (queue, cache_load, prefill, decode), measured here and modeled on
    CloudMatrix384; cache_load (the cached prefix's pool transfer) is modeled only: its measured
    time is part of prefill's."""
    return {"measured_s": timing.measured_s, "modeled_s": timing.modeled_s,
            "phases": {p: {"measured_s": timing.measured.get(p, 0.0), "modeled_s": timing.modeled.get(p, 0.0)}
                       for p in ("queue", "cache_load", "prefill", "decode")}}


def usage_json(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


class Shape:
    """The response objects of one endpoint ("text_completion" or "chat.completion")."""

    def __init__(self, chat: bool, request_id: str, model: str, created: int) -> None:
        self.chat, self.model, self.created = chat, model, created
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def completion(self, choices: list[tuple[str, Any, Finish]], usage: Usage, timing: Timing) -> dict[str, Any]:
        """choices: (text, logprobs object or None, finish) each, in index order."""
        out = []
        for index, (text, logprobs, finish) in enumerate(choices):
            choice = {"index": index, "logprobs": logprobs, "finish_reason": finish.reason}
            choice |= {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            out.append(choice)
        return self._head("chat.completion" if self.chat else "text_completion") | {
            "choices": out, "usage": usage_json(usage), "timing": timing_json(timing)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False, index: int = 0,
              logprobs: Any = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            choice["delta"] = delta | ({"content": text} if text is not None else {})
        else:
            choice["text"] = text or ""
        return self._head(self._chunk_object) | {"choices": [choice]}

    def usage_chunk(self, usage: Usage, timing: Timing) -> dict[str, Any]:
        return self._head(self._chunk_object) | {"choices": [], "usage": usage_json(usage),
                                                 "timing": timing_json(timing)}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"
