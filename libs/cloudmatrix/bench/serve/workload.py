"""What `cmx bench serve` sends: prompts as token ids, output lengths, arrival times.

- ``synthetic``: random prompts of one length whose first ``shared_prefix`` fraction is the same
  for every request (context-cache hits on a known share of the tokens).
- ``mooncake``: a Mooncake FAST'25 trace (``timestamp`` ms, ``input_length``, ``output_length``,
  ``hash_ids``: one id per 512-token block), scaled down by ``scale``: each hash block becomes
  512 / scale tokens, drawn from a generator seeded by the hash id, so equal ids give equal token
  blocks and the trace's prefix sharing (and its cache hits) survives; lengths shrink by the same
  factor.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512
FIRST_TOKEN_ID = 3          # ids below are special (bos / eos / pad)


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    output_len: int
    arrival_s: float = 0.0  # offset from the start (trace replay); 0 for closed-loop modes
    block_ids: tuple[int, ...] = ()  # trace replay: the hash id of each (scaled) block sent


@dataclasses.dataclass(frozen=True)
class TraceReuse:
    """The trace's own block-level reuse over the replayed requests: ``block_reuse`` = share of
    hash blocks seen before; ``prefix_reuse`` = share of prompt tokens in a leading run of blocks
    seen before (what a prefix cache can hit)."""

    block_reuse: float
    prefix_reuse: float


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n)]


def synthetic(count: int, input_len: int, output_len: int, shared_prefix: float, vocab: int,
              seed: int = 0) -> list[BenchRequest]:
    if not 0 <= shared_prefix < 1 or min(count, input_len, output_len) < 1:
        raise ValueError("shared_prefix must be in [0, 1); count, input_len and output_len >= 1")
    rng = random.Random(seed)
    prefix = _tokens(rng, int(input_len * shared_prefix), vocab)
    return [BenchRequest(prefix + _tokens(rng, input_len - len(prefix), vocab), output_len) for _ in range(count)]


def held_out(checkpoint: str | Path, count: int, input_len: int, output_len: int, offset: int = 0) -> list[BenchRequest]:
    """Prompts of ``input_len`` tokens cut from the test split of the corpus the shipped model was
    trained on (texts it never saw), at evenly spaced offsets of the split's token stream, as
    `cmx eval` cuts its acceptance prompts; ``offset`` shifts them (another repeat, other prompts)."""
    from cloudmatrix.model.tokenizer import TextTokenizer
    from cloudmatrix.train.corpus import load_corpus
    from cloudmatrix.train.data import token_stream

    tokenizer = TextTokenizer.load(checkpoint)
    stream = token_stream(tokenizer.tok, load_corpus().texts("test"), tokenizer.bos_id, tokenizer.eos_id)
    span = len(stream) - input_len
    if span < count:
        raise ValueError(f"the test split has {len(stream)} tokens: too few for {count} prompts of {input_len}")
    starts = [(i * span // count + offset) % (span + 1) for i in range(count)]
    return [BenchRequest(stream[s:s + input_len].tolist(), output_len) for s in starts]


def read_trace(path: str | Path, limit: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == limit:
                break
    return rows


def mooncake(rows: list[dict], scale: int, vocab: int, time_scale: float = 1.0, max_output: int = 0,
             max_len: int = 0, seed: int = 0) -> list[BenchRequest]:
    """Requests of a Mooncake trace, ``scale`` times shorter; arrivals ``time_scale`` times
    slower (2.0 = half the rate); outputs capped at ``max_output`` tokens when > 0; prompts cut
    so that prompt + output fit ``max_len`` (the model's context) when > 0 (a cut keeps the
    prompt's leading blocks, so its prefix sharing stays). A block's tokens depend on (seed, hash
    id): another seed gives prompts no cache has seen."""
    if scale < 1 or MOONCAKE_BLOCK_TOKENS % scale:
        raise ValueError(f"scale must divide {MOONCAKE_BLOCK_TOKENS}, got {scale}")
    block = MOONCAKE_BLOCK_TOKENS // scale
    start = rows[0]["timestamp"] if rows else 0
    requests = []
    for row in rows:
        output = max(1, row["output_length"] // scale)
        output = min(output, max_output) if max_output else output
        length = max(1, row["input_length"] // scale)
        if max_len:
            output = min(output, max_len - 1)
            length = min(length, max_len - output)
        prompt = [t for h in row["hash_ids"] for t in _tokens(random.Random(f"{seed}:{h}"), block, vocab)][:length]
        ids = tuple(row["hash_ids"][:-(-len(prompt) // block)])
        requests.append(BenchRequest(prompt, output, (row["timestamp"] - start) / 1e3 * time_scale, ids))
    return requests


def trace_reuse(requests: list[BenchRequest], block_tokens: int) -> TraceReuse:
    """Reuse within the requests as sent (``block_ids``, prompt lengths)."""
    seen: set[int] = set()
    blocks = reused = prefix_tokens = tokens = 0
    for r in requests:
        ids = r.block_ids
        lead = next((i for i, h in enumerate(ids) if h not in seen), len(ids))
        blocks, reused = blocks + len(ids), reused + sum(h in seen for h in ids)
        tokens += len(r.prompt)
        prefix_tokens += min(lead * block_tokens, len(r.prompt))
        seen.update(ids)
    return TraceReuse(reused / max(blocks, 1), prefix_tokens / max(tokens, 1))
