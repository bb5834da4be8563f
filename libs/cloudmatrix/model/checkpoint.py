"""Hugging Face checkpoint I/O: config.json + *.safetensors (single file or sharded with an index)."""
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


def safetensors_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint_dir / n for n in names]
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {checkpoint_dir}")
    return files


def read_state_dict(checkpoint_dir: str | Path, cfg: ModelConfig, keep=lambda key: True) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint that belong to the first ``num_hidden_layers`` layers.

    Extra layers (DeepSeek's multi-token-prediction module sits at index num_hidden_layers) are
    skipped; ``keep`` filters further (an expert-parallel die loads only its experts).
    """
    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(Path(checkpoint_dir)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                match = _LAYER_KEY.match(key)
                if match and int(match.group(1)) >= cfg.num_hidden_layers:
                    continue
                if keep(key):
                    state[key] = f.get_tensor(key)
    return state


def load_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> DeepseekV3:
    """Build the model from a checkpoint directory; every weight must be present.

    An INT8 (W8A8) checkpoint, marked by its config.json quantization_config, loads through
    ``cloudmatrix.quant``; its float parts are fp32, so it takes no other dtype.
    """
    # Imported here: cloudmatrix.quant builds on this module.
    from cloudmatrix.quant.int8_checkpoint import is_int8_checkpoint, load_int8_model
    if is_int8_checkpoint(checkpoint_dir):
        if dtype != torch.float32:
            raise ValueError(f"{checkpoint_dir} is an INT8 checkpoint; it loads with dtype float32 only, not {dtype}")
        return load_int8_model(checkpoint_dir)
    cfg = load_config(checkpoint_dir)
    model = DeepseekV3(cfg)
    state = {k: v.to(dtype) for k, v in read_state_dict(checkpoint_dir, cfg).items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(f"checkpoint {checkpoint_dir} lacks {len(result.missing_keys)} weights, e.g. {result.missing_keys[:3]}")
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {checkpoint_dir} has unknown weights, e.g. {result.unexpected_keys[:3]}")
    return model.to(dtype).eval()


def save_checkpoint(model: DeepseekV3, out_dir: str | Path) -> None:
    """Write config.json and model.safetensors (byte-for-byte deterministic for equal weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
