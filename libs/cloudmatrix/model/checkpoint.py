"""Hugging Face checkpoint I/O: config.json + *.safetensors (single file or sharded with an index).

The MTP module (``DeepseekV3.mtp[0]`` in memory) is stored as DeepSeek-V3 publishes it: under
``model.layers.{num_hidden_layers}.``, with copies of the shared embedding and output head at
``embed_tokens.weight`` and ``shared_head.head.weight`` there. Loading ignores those two copies.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cloudmatrix.model.config import ModelConfig, load_config
from cloudmatrix.model.transformer import DeepseekV3

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_MTP = "mtp.0."
# The MTP layer's copies of shared tensors: checkpoint suffix -> the model's own key.
_MTP_SHARED = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mtp_prefix(cfg: ModelConfig) -> str:
    return f"model.layers.{cfg.num_hidden_layers}."


def safetensors_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint_dir / n for n in names]
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {checkpoint_dir}")
    return files


def _in_memory_key(key: str, cfg: ModelConfig, mtp: bool) -> str | None:
    """The model's key for a checkpoint key; None for a tensor this load skips."""
    match = _LAYER_KEY.match(key)
    if not match or int(match.group(1)) < cfg.num_hidden_layers:
        return key
    prefix = mtp_prefix(cfg)
    if not mtp or not key.startswith(prefix) or key[len(prefix):] in _MTP_SHARED:
        return None
    return _MTP + key[len(prefix):]


def read_state_dict(checkpoint_dir: str | Path, cfg: ModelConfig, keep=lambda key: True,
                    mtp: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's keys.

    Layers past ``num_hidden_layers`` (DeepSeek's MTP module) are skipped unless ``mtp``, which
    maps them to ``mtp.0.``; ``keep`` filters by checkpoint key (a die loads only its experts).
    """
    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(Path(checkpoint_dir)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = _in_memory_key(key, cfg, mtp)
                if name is not None and keep(key):
                    state[name] = f.get_tensor(key)
    return state


def load_float_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, mtp: bool = False) -> DeepseekV3:
    """Build the model from a float checkpoint directory; every weight must be present. Weights
    stored in another float dtype (the shipped checkpoint is bf16) are cast to ``dtype``; with
    ``mtp`` the MTP module is loaded too. ``cloudmatrix.checkpoints.load_model`` takes INT8
    checkpoints as well."""
    cfg = load_config(checkpoint_dir)
    model = DeepseekV3(cfg, mtp=mtp)
    state = {k: v.to(dtype) for k, v in read_state_dict(checkpoint_dir, cfg, mtp=mtp).items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(f"checkpoint {checkpoint_dir} lacks {len(result.missing_keys)} weights, e.g. {result.missing_keys[:3]}")
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {checkpoint_dir} has unknown weights, e.g. {result.unexpected_keys[:3]}")
    return model.to(dtype).eval()


def checkpoint_state(model: DeepseekV3, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint keys (MTP at ``model.layers.{N}.``), float ones cast
    to ``dtype`` (int8 tensors and their scales are kept as they are)."""
    prefix = mtp_prefix(model.cfg)
    state = {}
    for key, t in model.state_dict().items():
        name = prefix + key[len(_MTP):] if key.startswith(_MTP) else key
        state[name] = t.detach().contiguous()
    if len(model.mtp):
        for suffix, own in _MTP_SHARED.items():
            state[prefix + suffix] = state[own].clone()
    if dtype is not None:
        state = {k: v.to(dtype) if v.dtype == torch.float32 and not _is_scale(k) else v for k, v in state.items()}
    return state


def _is_scale(key: str) -> bool:
    return key.endswith(("weight_scale", "smooth_scale", "e_score_correction_bias"))


def save_checkpoint(model: DeepseekV3, out_dir: str | Path, dtype: str = "float32") -> None:
    """Write config.json and model.safetensors (byte-for-byte deterministic for equal weights)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(dtype), indent=2, sort_keys=True) + "\n")
    save_file(checkpoint_state(model, DTYPES[dtype]), str(out / "model.safetensors"), metadata={"format": "pt"})
