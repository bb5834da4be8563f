"""The attention core MLA runs on: exact fp32 softmax, or one of the fp16 flash-attention modes.

Shape legend: B = batch, Hq / Hkv = query / key-value heads (Hq a multiple of Hkv), S = queries,
T = keys, Dqk = query/key dim, Dv = value dim.
"""
from __future__ import annotations

import torch

from cloudmatrix.kernels.pasa import flash_attention

ATTENTION_CORES = ("fp32", "fp16-naive", "pasa", "pasa-hybrid")
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
    """Dispatch to the selected core; every core returns fp32 [B, Hq, S, Dv]."""
    if core == "fp32":
        return softmax_attention(q, k, v, mask, scale)
    if core not in ATTENTION_CORES:
        raise ValueError(f"attention core {core!r} is not one of {', '.join(ATTENTION_CORES)}")
    return flash_attention(q, k, v, scale=scale, mode=core, mask=mask).float()
