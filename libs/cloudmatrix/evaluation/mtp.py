"""The acceptance a greedy speculative decoder would see: greedy decoding with the main model,
where at every step the MTP module drafts t_{i+2} from h_i and the main model's own greedy
t_{i+1}, and the draft counts as accepted when the main model's next greedy token equals it.

Shape legend: B = prompts, P = prompt length, D = hidden size.
"""
from __future__ import annotations

import torch

from cloudmatrix.model.transformer import DeepseekV3


@torch.inference_mode()
def greedy_acceptance(model: DeepseekV3, prompts: torch.Tensor, new_tokens: int) -> dict:
    """prompts [B, P] -> {"drafts", "accepted", "acceptance"} over ``new_tokens`` greedy steps."""
    if not len(model.mtp):
        raise ValueError("the model has no MTP module (load it with mtp=True)")
    b, p = prompts.shape
    kv = model.new_cache()
    positions = torch.arange(p).expand(b, -1)  # [B, P]
    hidden = model.hidden_states(prompts, positions, kv)  # [B, P, D]
    greedy = model.lm_head(hidden[:, -1]).argmax(-1)  # [B]: t_{P}
    # The MTP module's KV over the prompt: entries (h_j, t_{j+1}) for j < P - 1.
    model.mtp_hidden(hidden[:, :-1], prompts[:, 1:], positions[:, :-1], kv)
    h_last, drafts, accepted = hidden[:, -1:], 0, 0
    for step in range(new_tokens):
        pos = torch.full((b, 1), p - 1 + step)
        draft = model.lm_head(model.mtp_hidden(h_last, greedy[:, None], pos, kv)).argmax(-1)[:, 0]  # [B]
        h_last = model.hidden_states(greedy[:, None], pos + 1, kv)  # [B, 1, D]
        following = model.lm_head(h_last[:, 0]).argmax(-1)  # [B]
        drafts += b
        accepted += int((draft == following).sum())
        greedy = following
    return {"drafts": drafts, "accepted": accepted, "acceptance": round(accepted / max(drafts, 1), 5),
            "prompts": b, "prompt_tokens": p, "new_tokens": new_tokens}
