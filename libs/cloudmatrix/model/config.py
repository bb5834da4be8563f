"""DeepSeek-V3 model configuration, read from and written to a Hugging Face config.json."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# Keys of a DeepSeek-V3 config.json that we read; everything else is carried through untouched.
_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "n_routed_experts",
    "num_experts_per_tok", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture hyper-parameters, named as in DeepSeek-V3's config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0  # MTP modules in the checkpoint (DeepSeek-V3: 1); serving ignores them
    bos_token_id: int = 0
    eos_token_id: int = 1
    hidden_act: str = "silu"
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    model_id: str = "deepseek-v3"

    def __post_init__(self) -> None:
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok exceeds n_routed_experts")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.scoring_func != "sigmoid":
            raise ValueError(f"scoring_func={self.scoring_func!r}: only 'sigmoid' (DeepSeek-V3) is supported")
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even")
        if self.num_nextn_predict_layers not in (0, 1):
            raise ValueError(f"num_nextn_predict_layers={self.num_nextn_predict_layers}: "
                             "only 0 or 1 MTP module is supported")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def moe_layers(self, mtp: bool = False) -> list[int]:
        """The MoE layers' indices; with ``mtp``, the MTP module's too (layer num_hidden_layers)."""
        last = self.num_hidden_layers + (self.num_nextn_predict_layers if mtp else 0)
        return [i for i in range(last) if self.is_moe_layer(i)]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"config.json lacks required keys: {', '.join(missing)}")
        rope_scaling = raw.get("rope_scaling") or (raw.get("rope_parameters") or {})
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only plain RoPE)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in fields and (v is not None or k == "q_lora_rank")}
        if "rope_theta" not in raw and "rope_theta" in rope_scaling:
            kwargs["rope_theta"] = rope_scaling["rope_theta"]
        kwargs.setdefault("model_id", raw.get("_name_or_path") or raw.get("model_id") or "deepseek-v3")
        return cls(**kwargs)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A config.json that transformers' DeepseekV3ForCausalLM loads."""
        out = dataclasses.asdict(self)
        out.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            rope_scaling=None,
            attention_bias=False,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            moe_layer_freq=1,
            torch_dtype=torch_dtype,
            initializer_range=0.02,
        )
        return out


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {checkpoint_dir}")
    return ModelConfig.from_dict(json.loads(path.read_text()))
