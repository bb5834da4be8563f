"""In-process reference engine: prompt prefill, then token-by-token decode with the latent cache."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import torch

from cloudmatrix.model.sampling import sample_token
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.sampling_params import SamplingParams, StopRule


def generate(model: DeepseekV3, prompt_ids: list[int], params: SamplingParams,
             ignore_eos: bool = False) -> Iterator[int]:
    """Yield generated token ids until the params' StopRule ends the request: EOS (yielded; not
    with ``ignore_eos`` here or in the params), a stop token, max_tokens or the context limit."""
    limit = model.cfg.max_position_embeddings
    if not prompt_ids:
        raise ValueError("prompt is empty")
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context limit is {limit}")
    rule = StopRule.of(dataclasses.replace(params, ignore_eos=params.ignore_eos or ignore_eos),
                       model.cfg.eos_token_id, limit)
    cache = model.new_cache()
    ids = torch.tensor([prompt_ids])  # [1, S]
    positions = torch.arange(len(prompt_ids))[None]
    for new_tokens in itertools.count(1):
        logits = model(ids, positions, cache)[0, -1]  # [V]
        token = sample_token(logits, params, params.generator(int(positions[0, -1]) + 1))
        yield token
        if rule.reason(token, new_tokens, len(prompt_ids) + new_tokens) is not None:
            return
        ids, positions = torch.tensor([[token]]), positions[:, -1:] + 1
