"""The attention core MLA runs on: exact fp32 softmax, or one of the fp16 flash-attention modes.

Shape legend: B = batch, Hq / Hkv = query / key-value heads (Hq a multiple of Hkv), S = queries,
T = keys, Dqk = query/key dim, Dv = value dim.
"""
from __future__ import annotations

import torch

from cloudmatrix.kernels.pasa import flash_attention

ATTENTION_CORES = ("fp32", "fp16-naive", "pasa", "pasa-hybrid")
SPLIT_QUERIES = 2  # flash-core calls with at most this many queries per row run one query at a time
# A large finite negative for masked scores: a fully masked row never turns into NaN.
MASK_VALUE = -1e30


def softmax_attention(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, Hq, S, Dqk], k: [B, Hkv, T, Dqk], v: [B, Hkv, T, Dv], mask: [B, S, T] -> [B, Hq, S, Dv]."""
    b, hq, s, _ = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, s, -1)  # [B, Hkv, G, S, Dqk]
    scores = torch.einsum("bhgsd,bhtd->bhgst", qg, k) * scale
    scores = scores.masked_fill(~mask[:, None, None], MASK_VALUE)
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    probs = probs * mask.any(dim=-1)[:, None, None, :, None]  # a fully masked row gives zeros, as PASA does
    return torch.einsum("bhgst,bhtv->bhgsv", probs, v).reshape(b, hq, s, -1)


def attention(q, k, v, mask: torch.Tensor, scale: float, core: str = "fp32") -> torch.Tensor:
    """Dispatch to the selected core; every core returns fp32 [B, Hq, S, Dv].

    A flash core's result for one query depends on every key some query of its row may attend
    (PASA shifts each KV tile by the mean of the keys in use, and the fp16 rounding follows): so a
    decode step's queries (S <= 2: a token and its MTP draft) run one position at a time, each
    exactly as a step of that one token would, and verifying a draft never changes a token."""
    if core == "fp32":
        return softmax_attention(q, k, v, mask, scale)
    if core not in ATTENTION_CORES:
        raise ValueError(f"attention core {core!r} is not one of {', '.join(ATTENTION_CORES)}")
    if 1 < q.shape[2] <= SPLIT_QUERIES:
        return torch.cat([flash_attention(q[:, :, i:i + 1], k, v, scale=scale, mode=core, mask=mask[:, i:i + 1]).float()
                          for i in range(q.shape[2])], dim=2)
    return flash_attention(q, k, v, scale=scale, mode=core, mask=mask).float()
