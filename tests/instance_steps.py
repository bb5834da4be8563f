"""Prompts through a loaded instance's step loop (instance/generate.py), read back as the dies'
log-probabilities: what the expert-parallel tests compare with the in-process model."""
from __future__ import annotations

import asyncio

import torch

from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.generate import serving
from cloudmatrix.instance.request import Request
from cloudmatrix.sampling_params import MAX_LOGPROBS, SamplingParams, StopRule, TokenLogprobs

TOP = MAX_LOGPROBS


async def position_logprobs(driver, blocks: BlockManager, sequences: list[list[int]],
                            chunk_tokens: int = 2**31) -> list[list[TokenLogprobs]]:
    """Each sequence in one request: per position i, the log-probabilities the dies give for
    what follows token i (the next token of the sequence, then the greedy sample), with the
    ``TOP`` most likely. All requests step together, in chunks of ``chunk_tokens``."""
    params = SamplingParams(max_tokens=1, logprobs=TOP, prompt_logprobs=TOP)
    async with serving(driver, blocks) as loop:
        async def one(i: int, tokens: list[int]) -> list[TokenLogprobs]:
            request = Request(f"s{i}", list(tokens), params, StopRule(1), chunk_tokens=chunk_tokens)
            by_position: dict[int, TokenLogprobs] = {}
            async for event in loop.submit(request):
                by_position.update(enumerate(event.prompt_logprobs, event.prompt_start - 1))
                if event.logprobs:
                    by_position[len(tokens) - 1] = event.logprobs[0]
            return [by_position[p] for p in range(len(tokens))]

        return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(sequences))))


def reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """[n, V] log-softmax of the in-process model's logits at every position of ``tokens``."""
    with torch.inference_mode():
        logits = model(torch.tensor([tokens]), torch.arange(len(tokens))[None], model.new_cache())[0]
    return torch.log_softmax(logits.float(), dim=-1)


def max_error(got: list[TokenLogprobs], ref: torch.Tensor) -> float:
    """Largest difference between the dies' log-probabilities (each position's token and its
    alternatives) and the reference's for the same ids."""
    worst = 0.0
    for position, lp in enumerate(got):
        ids = [lp.token_id] + [i for i, _ in lp.top]
        values = torch.tensor([lp.logprob] + [v for _, v in lp.top])
        worst = max(worst, (values - ref[position, ids]).abs().max().item())
    return worst


def alternatives_are_the_most_likely(got: list[TokenLogprobs], ref: torch.Tensor, tol: float) -> bool:
    """The dies' top ids carry the reference's top values (ties within ``tol`` may swap ids)."""
    return all(torch.allclose(torch.tensor([v for _, v in lp.top]), ref[p].topk(len(lp.top)).values, atol=tol)
               for p, lp in enumerate(got))
