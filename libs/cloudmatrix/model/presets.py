"""Deterministic random-init checkpoints of DeepSeek-V3 architecture (the project makes its own)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from cloudmatrix.model.checkpoint import save_checkpoint
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.tokenizer import build_tokenizer, save_tokenizer
from cloudmatrix.model.transformer import DeepseekV3

PRESETS: dict[str, ModelConfig] = {
    # ~8M parameters: 4 layers (1 dense), 16 routed experts top-4 in 4 groups, 1 shared expert.
    "tiny": ModelConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, q_lora_rank=128,
        n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, max_position_embeddings=2048, model_id="cmx-tiny",
    ),
    # The shipped trained model (models/cmx-tiny-py): tiny with a 4,096-id vocabulary (byte-level BPE of
    # the Python standard library) and one MTP module; ~12M parameters with the MTP layer.
    "tiny-py": ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, q_lora_rank=128,
        n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, max_position_embeddings=2048, num_nextn_predict_layers=1,
        model_id="cmx-tiny-py",
    ),
    # ~73M parameters: 6 layers (1 dense), 64 routed experts top-8 in 8 groups, 1 shared expert.
    "small": ModelConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1536, moe_intermediate_size=128,
        num_hidden_layers=6, num_attention_heads=8, n_routed_experts=64, num_experts_per_tok=8,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, q_lora_rank=256,
        n_shared_experts=1, n_group=8, topk_group=4, first_k_dense_replace=1,
        routed_scaling_factor=2.5, max_position_embeddings=4096, model_id="cmx-small",
    ),
}

# Standard deviations of the random init. Linear weights follow DeepSeek's initializer_range;
# the lm_head is wider so a random model's next-token distribution is peaked enough for greedy
# decoding to be stable, and norms / correction bias get noise so every parameter matters.
INIT_STD = {"linear": 0.02, "embed": 1.0, "lm_head": 0.08, "norm": 0.1, "bias": 0.02}


def _seed_for(name: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_tensor(name: str, t: torch.Tensor, seed: int) -> None:
    gen = torch.Generator().manual_seed(_seed_for(name, seed))
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        t.copy_(1.0 + INIT_STD["norm"] * noise)
    elif name.endswith("e_score_correction_bias"):
        t.copy_(INIT_STD["bias"] * noise)
    elif name.startswith("lm_head"):
        t.copy_(INIT_STD["lm_head"] * noise)
    elif "embed_tokens" in name:
        t.copy_(INIT_STD["embed"] * noise)
    else:
        t.copy_(INIT_STD["linear"] * noise)


def random_model(cfg: ModelConfig, seed: int = 0) -> DeepseekV3:
    """Each tensor is drawn from its own generator seeded by (seed, name): order-independent."""
    model = DeepseekV3(cfg, mtp=bool(cfg.num_nextn_predict_layers))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            _init_tensor(name, t, seed)
    return model.eval()


def create_checkpoint(preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(random_model(cfg, seed), out)
    save_tokenizer(build_tokenizer(cfg.vocab_size), out, cfg.max_position_embeddings)
    return out
