"""Requests to replay: a Mooncake trace (timestamps, lengths and the 512-token block ids that
carry its prefix sharing), or synthetic arrivals (Poisson or gamma) with fixed lengths."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt: int                      # tokens
    output: int                      # tokens, the first (the prefill's) included
    blocks: tuple[int, ...] = ()     # the trace's block ids, one per block_tokens prompt tokens (a shared id = a shared prefix)
    block_tokens: int = MOONCAKE_BLOCK_TOKENS


def read_mooncake(path: str | Path, limit: int = 0, rate_scale: float = 1.0, scale: int = 1) -> list[TraceRequest]:
    """The first ``limit`` requests (0: all) of a Mooncake JSONL trace; ``rate_scale`` 2 sends
    them twice as fast (arrival gaps halved); ``scale`` divides lengths and the block size alike
    (the sharing pattern stays), as `cmx bench serve --trace --scale` does for the tiny model."""
    if not rate_scale > 0:
        raise ValueError(f"rate_scale must be > 0, got {rate_scale}")
    if scale < 1 or MOONCAKE_BLOCK_TOKENS % scale:
        raise ValueError(f"scale must divide {MOONCAKE_BLOCK_TOKENS}, got {scale}")
    out: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                request = TraceRequest(row["timestamp"] / 1e3 / rate_scale, max(1, int(row["input_length"]) // scale),
                                       max(1, int(row["output_length"]) // scale), tuple(row.get("hash_ids", ())),
                                       MOONCAKE_BLOCK_TOKENS // scale)
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a Mooncake trace line ({err})") from None
            if request.prompt < 1:
                raise ValueError(f"{path}:{number}: input_length must be >= 1")
            out.append(request)
            if len(out) == limit:
                break
    if not out:
        raise ValueError(f"{path}: no requests")
    start = out[0].arrival_s
    return [dataclasses.replace(r, arrival_s=r.arrival_s - start) for r in out]


LENGTHS = ("fixed", "uniform", "exponential")


def synthetic(count: int, rate: float, prompt: int, output: int, burstiness: float = 1.0,
              seed: int = 0, lengths: str = "fixed") -> list[TraceRequest]:
    """``count`` requests of ``prompt`` + ``output`` tokens on average, gamma inter-arrivals of
    mean 1 / rate (``burstiness`` 1: Poisson); no prefix sharing. ``rate`` 0: all at once.
    ``lengths``: every request the same, uniform over [0.5, 1.5] x the mean, or exponential."""
    if count < 1 or prompt < 1 or output < 1 or rate < 0 or burstiness <= 0:
        raise ValueError("synthetic: need count, prompt, output >= 1, rate >= 0, burstiness > 0")
    if lengths not in LENGTHS:
        raise ValueError(f"lengths must be one of {', '.join(LENGTHS)}, got {lengths!r}")
    rng, at, out = random.Random(seed), 0.0, []
    draw = {"fixed": lambda mean: mean, "uniform": lambda mean: rng.uniform(0.5 * mean, 1.5 * mean),
            "exponential": lambda mean: rng.expovariate(1.0 / mean)}[lengths]
    for _ in range(count):
        out.append(TraceRequest(at, max(1, round(draw(prompt))), max(1, round(draw(output)))))
        if rate:
            at += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out
