"""One streamed completion through the gateway's OpenAI API, timed at the client the way vLLM's
``bench serve`` times it: TTFT at the first chunk carrying text, an inter-token latency for every
later chunk, end-to-end at the last byte; token counts from the final ``usage`` chunk."""
from __future__ import annotations

import dataclasses
import json
import time

import aiohttp

from cloudmatrix.bench.serve.workload import BenchRequest


@dataclasses.dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = dataclasses.field(default_factory=list)
    error: str = ""
    text: str = ""  # the completion as streamed (checked against a reference by the fault tests)

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def completion_body(model: str, request: BenchRequest) -> dict:
    return {"model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def send(session: aiohttp.ClientSession, url: str, model: str, request: BenchRequest) -> RequestResult:
    result = RequestResult(len(request.prompt))
    start = last = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=completion_body(model, request)) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for line in response.content:
                last = _on_line(line, result, start, last)
    except (aiohttp.ClientError, TimeoutError) as err:
        result.error = f"{type(err).__name__}: {err}"
    result.e2e_s = time.perf_counter() - start
    if result.ok and result.output_tokens != request.output_len:
        result.error = f"asked for {request.output_len} tokens, got {result.output_tokens}"
    return result


def _on_line(line: bytes, result: RequestResult, start: float, last: float) -> float:
    """Fold one SSE line into the result; returns the time of the last text chunk."""
    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
        return last
    event, now = json.loads(line[6:]), time.perf_counter()
    if "error" in event:
        result.error = event["error"].get("message", "error event")
    if event.get("usage"):
        usage = event["usage"]
        result.output_tokens = usage.get("completion_tokens", 0)
        result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    text = "".join(choice.get("text") or "" for choice in event.get("choices", ()))
    result.text += text
    if text:
        if result.ttft_s == 0.0:
            result.ttft_s = now - start
        else:
            result.itl_s.append(now - last)
        return now
    return last
