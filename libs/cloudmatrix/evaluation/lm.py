"""The model on the test windows: per-token negative log-likelihood and greedy choice, per
precision, and the MTP module's teacher-forced guess of t_{i+2}.

Shape legend: W = windows, B = windows per batch, L = tokens fed per window, V = vocab.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from cloudmatrix.model.transformer import DeepseekV3


@dataclasses.dataclass
class TokenScores:
    """Per predicted token, in window order: nll [W * L] (nats), argmax [W * L]; with the MTP module
    also mtp_argmax [W * (L - 1)] (its guess of t_{i+2} at each i < L - 1)."""

    nll: torch.Tensor
    argmax: torch.Tensor
    mtp_argmax: torch.Tensor | None = None


@torch.inference_mode()
def score_windows(model: DeepseekV3, windows: torch.Tensor, batch_size: int = 8) -> TokenScores:
    """Run the model over windows [W, L + 1]; the MTP module too when the model has it."""
    nll, argmax, mtp = [], [], []
    for window in windows.split(batch_size):
        ids = window[:, :-1]  # [B, L]
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        kv = model.new_cache()
        hidden = model.hidden_states(ids, positions, kv)  # [B, L, D]
        logits = model.lm_head(hidden).float()  # [B, L, V]
        nll.append(F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction="none"))
        argmax.append(logits.argmax(-1).flatten())
        if len(model.mtp):
            h_mtp = model.mtp_hidden(hidden[:, :-1], ids[:, 1:], positions[:, :-1], kv)  # [B, L-1, D]
            mtp.append(model.lm_head(h_mtp).argmax(-1).flatten())
    return TokenScores(torch.cat(nll), torch.cat(argmax), torch.cat(mtp) if mtp else None)


def summarize(nll: torch.Tensor, correct: torch.Tensor | None, target_bytes: torch.Tensor) -> dict:
    """Cross-entropy (nats per token), perplexity, bits per byte, top-1 accuracy (None without
    ``correct``, the per-token hits)."""
    ce = float(nll.double().mean())
    return {"cross_entropy": round(ce, 5), "perplexity": round(float(torch.tensor(ce).exp()), 3),
            "bits_per_byte": round(float(nll.double().sum() / torch.log(torch.tensor(2.0, dtype=torch.float64))
                                         / target_bytes.sum()), 5),
            "top1_accuracy": None if correct is None else round(float(correct.double().mean()), 5),
            "tokens": int(nll.numel())}
