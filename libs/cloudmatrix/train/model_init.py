"""The initial weights of a model trained from scratch (not the random-init presets, which are
shaped so that an untrained model still decodes stably)."""
from __future__ import annotations

import hashlib
import math

import torch

from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.transformer import DeepseekV3

# Projections that write into the residual stream: scaled down by sqrt(2 * blocks), as GPT-2 does.
_RESIDUAL_WRITERS = ("o_proj.weight", "down_proj.weight")


def _generator(name: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"train-init:{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def init_for_training(model: DeepseekV3, std: float, seed: int) -> DeepseekV3:
    """Matrices ~ N(0, std) (residual writers smaller), norms 1, router biases 0; each tensor from
    its own generator seeded by (seed, name), so the result does not depend on module order."""
    blocks = model.cfg.num_hidden_layers + len(model.mtp)
    for name, t in model.state_dict().items():
        if t.dim() < 2:
            t.copy_(torch.ones_like(t) if name.endswith("norm.weight") else torch.zeros_like(t))
            continue
        scale = std / math.sqrt(2 * blocks) if name.endswith(_RESIDUAL_WRITERS) else std
        t.copy_(scale * torch.randn(t.shape, generator=_generator(name, seed)))
    return model


def new_model(cfg: ModelConfig, std: float, seed: int) -> DeepseekV3:
    model = DeepseekV3(cfg, mtp=bool(cfg.num_nextn_predict_layers))
    return init_for_training(model, std, seed).train()
