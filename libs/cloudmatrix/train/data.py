"""Token streams and training windows.

Shape legend: B = batch, L = window length (tokens fed), so a window holds L + 1 tokens.

Each file becomes BOS + its tokens + EOS; files are concatenated in split order into one stream.
The window starts of step k come from a generator seeded by (seed, k) alone, so a resumed run
draws exactly the batches the uninterrupted run would have drawn.
"""
from __future__ import annotations

import hashlib

import torch
from tokenizers import Tokenizer


def token_stream(tokenizer: Tokenizer, texts: list[str], bos_id: int, eos_id: int) -> torch.Tensor:
    """[N] int32: every text as BOS + tokens + EOS, in order."""
    parts = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        parts.append(torch.tensor([bos_id, *enc.ids, eos_id], dtype=torch.int32))
    if not parts:
        raise ValueError("no texts to tokenize")
    return torch.cat(parts)


def step_generator(seed: int, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"train-batch:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def training_batch(stream: torch.Tensor, batch: int, length: int, seed: int, step: int) -> torch.Tensor:
    """[B, L + 1] random windows of the stream for ``step`` (deterministic in (seed, step))."""
    if len(stream) < length + 2:
        raise ValueError(f"the token stream has {len(stream)} tokens; a window needs {length + 1}")
    starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=step_generator(seed, step))
    return torch.stack([stream[s:s + length + 1] for s in starts.tolist()]).long()


def eval_windows(stream: torch.Tensor, length: int, max_windows: int | None = None) -> torch.Tensor:
    """[W, L + 1] consecutive windows that overlap by one token, so every token of the stream
    after the first is predicted exactly once; the tail shorter than a window is dropped."""
    n = (len(stream) - 1) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"the token stream has {len(stream)} tokens; one window needs {length + 1}")
    return torch.stack([stream[i * length:i * length + length + 1] for i in range(n)]).long()
