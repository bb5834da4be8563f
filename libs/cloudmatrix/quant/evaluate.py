"""How far a quantized model is from its float original: logits error and greedy agreement.

Shape legend: S = prompt length, V = vocab.
"""
from __future__ import annotations

import dataclasses

import torch

from cloudmatrix.model.generate import generate
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.sampling_params import SamplingParams

# Held-out text (not in the calibration corpus) for the agreement prompts.
HELD_OUT_TEXT = (
    "Quantized experts multiply int8 tokens by int8 weights and accumulate in 32-bit integers.",
    "The router keeps its scores in floating point because close scores pick different experts.",
    "A request waits in the queue until a decode slot frees up on one of the dies.",
    "Smoothing moves the difficulty of outlier channels from activations into weights.",
    "Operators measure latency per token and throughput per accelerator under a deadline.",
    "The cache pool answers with blocks whose prefix hashes match the new prompt.",
    "Clipping trades a little error on the largest weights for finer steps on all others.",
    "Model weights stream from the memory pool when a new instance starts on the supernode.",
)


@dataclasses.dataclass(frozen=True)
class Agreement:
    logits_rel_l2: float  # ||q - f|| / ||f|| over all prompt positions
    # ||q - f|| / ||f - e||, e = logits of the embedding alone: the error relative to what the
    # decoder layers add (a random-init model's logits are dominated by the embedding path).
    layers_rel_l2: float
    top1_match: float  # fraction of positions where argmax agrees
    greedy_match: float  # fraction of prompts whose greedy continuation is identical
    prompts: int
    max_tokens: int


def heldout_prompts(tokenizer: TextTokenizer, vocab_size: int, n: int, seed: int = 1234) -> list[list[int]]:
    """n prompts not seen in calibration: the held-out sentences, then random ids of 8-32 tokens."""
    texts = [tokenizer.encode(t) for t in HELD_OUT_TEXT[:n]]
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (max(n - len(texts), 0),), generator=gen).tolist()
    rand = [[tokenizer.bos_id, *torch.randint(3, vocab_size, (s - 1,), generator=gen).tolist()] for s in lengths]
    return texts + rand


def prompt_logits(model: DeepseekV3, prompt: list[int]) -> torch.Tensor:
    """One prompt of S tokens -> logits [S, V] (fresh cache)."""
    ids = torch.tensor([prompt])  # [1, S]
    return model(ids, torch.arange(len(prompt))[None], model.new_cache())[0]


def greedy(model: DeepseekV3, prompt: list[int], max_tokens: int) -> list[int]:
    return list(generate(model, prompt, SamplingParams(max_tokens=max_tokens)))


def compare(float_model: DeepseekV3, quant_model: DeepseekV3, prompts: list[list[int]],
            max_tokens: int = 16) -> Agreement:
    """Logits at every prompt position and greedy ``max_tokens``-token continuations of each prompt."""
    err = ref_norm = layers_norm = agree = positions = same = 0
    for prompt in prompts:
        ref, got = prompt_logits(float_model, prompt), prompt_logits(quant_model, prompt)  # [S, V]
        err, ref_norm = err + float((got - ref).pow(2).sum()), ref_norm + float(ref.pow(2).sum())
        layers_norm += float((ref - embedding_logits(float_model, prompt)).pow(2).sum())
        agree, positions = agree + int((got.argmax(-1) == ref.argmax(-1)).sum()), positions + len(prompt)
        same += greedy(float_model, prompt, max_tokens) == greedy(quant_model, prompt, max_tokens)
    return Agreement((err / ref_norm) ** 0.5, (err / layers_norm) ** 0.5, agree / positions,
                     same / len(prompts), len(prompts), max_tokens)


@torch.inference_mode()
def embedding_logits(model: DeepseekV3, prompt: list[int]) -> torch.Tensor:
    """Logits [S, V] with every decoder layer skipped: lm_head(norm(embed(ids)))."""
    return model.lm_head(model.model.norm(model.model.embed_tokens(torch.tensor(prompt)))).float()
