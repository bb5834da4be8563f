"""In-process reference engine: prompt prefill, then token-by-token decode with the latent cache."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from cloudmatrix.model.sampling import SamplingParams, sample_token
from cloudmatrix.model.transformer import DeepseekV3


def generate(model: DeepseekV3, prompt_ids: list[int], params: SamplingParams,
             ignore_eos: bool = False) -> Iterator[int]:
    """Yield generated token ids; stops after EOS (which is yielded; unless ``ignore_eos``),
    max_tokens or the context limit."""
    limit = model.cfg.max_position_embeddings
    if not prompt_ids:
        raise ValueError("prompt is empty")
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context limit is {limit}")
    cache = model.new_cache()
    ids = torch.tensor([prompt_ids])  # [1, S]
    positions = torch.arange(len(prompt_ids))[None]
    for _ in range(min(params.max_tokens, limit - len(prompt_ids))):
        logits = model(ids, positions, cache)[0, -1]  # [V]
        token = sample_token(logits, params, params.generator(int(positions[0, -1]) + 1))
        yield token
        if token == model.cfg.eos_token_id and not ignore_eos:
            return
        ids, positions = torch.tensor([[token]]), positions[:, -1:] + 1
