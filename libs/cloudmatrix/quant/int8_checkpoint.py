"""INT8 checkpoints: safetensors with int8 weights + fp32 scales, config.json with a quantization_config.

A quantized linear ``<name>`` is stored as ``<name>.weight`` (int8 [N, K]), ``<name>.weight_scale``
(fp32 [N]) and ``<name>.smooth_scale`` (fp32 [K]); everything else is stored as in a float
checkpoint. ``cloudmatrix.model.checkpoint.load_model`` calls ``load_int8_model`` when config.json
says ``"quant_method": "cmx-w8a8"``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cloudmatrix.model.checkpoint import checkpoint_state, read_state_dict
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.quant.linear import Int8Linear
from cloudmatrix.quant.quantize_model import QuantSettings, float_matmuls, swap_to_int8

QUANT_METHOD = "cmx-w8a8"
# Copied from the float checkpoint: the tokenizer, and the training record of a trained model.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "train.json")


def quantization_config(model: DeepseekV3, settings: QuantSettings) -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "weights": "int8 per-channel symmetric",
        "activations": "int8 per-token dynamic symmetric",
        "smoothing_alpha": settings.alpha if settings.smooth else None,
        "clip_search": {"enabled": settings.clip, "block_size": settings.clip_block} if settings.clip else None,
        "calibration": {"samples": settings.calib_samples, "seq_len": settings.calib_seq_len,
                        "sample_cap": settings.sample_cap, "seed": settings.seed},
        "modules_not_converted": float_matmuls(model),
    }


def _raw_config(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {checkpoint_dir}")
    return json.loads(path.read_text())


def is_int8_checkpoint(checkpoint_dir: str | Path) -> bool:
    """Whether config.json carries our W8A8 quantization_config."""
    qcfg = _raw_config(Path(checkpoint_dir)).get("quantization_config") or {}
    return qcfg.get("quant_method") == QUANT_METHOD


def save_int8_checkpoint(model: DeepseekV3, out_dir: str | Path, source_dir: str | Path,
                         settings: QuantSettings) -> Path:
    """Write the quantized model: model.safetensors, config.json (the source's + quantization_config)
    and the source's tokenizer files and train.json."""
    if not any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("the model has no Int8Linear layers: quantize it before saving an INT8 checkpoint")
    out, source = Path(out_dir), Path(source_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _raw_config(source)
    config["quantization_config"] = quantization_config(model, settings)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = checkpoint_state(model)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "quant_method": QUANT_METHOD})
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out


def load_int8_model(checkpoint_dir: str | Path, mtp: bool = False) -> DeepseekV3:
    """Build the model (with its MTP module if ``mtp``), swap in Int8Linear for every
    ``<name>.weight_scale`` present, load strictly.

    Missing, unknown, mis-shaped or mis-typed tensors raise ValueError naming them.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not is_int8_checkpoint(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir}/config.json has no quantization_config with quant_method {QUANT_METHOD!r}")
    cfg = ModelConfig.from_dict(_raw_config(checkpoint_dir))
    state = read_state_dict(checkpoint_dir, cfg, mtp=mtp)
    names = sorted(k[:-len(".weight_scale")] for k in state if k.endswith(".weight_scale"))
    model = swap_to_int8(DeepseekV3(cfg, mtp=mtp), names)
    _check_tensors(checkpoint_dir, model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_tensors(where: Path, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"INT8 checkpoint {where} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if unknown:
        raise ValueError(f"INT8 checkpoint {where} has unknown tensors, e.g. {unknown[:3]}")
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"INT8 checkpoint {where}: tensor {key} is {got.dtype} {list(got.shape)}, "
                             f"the model expects {want.dtype} {list(want.shape)}")
