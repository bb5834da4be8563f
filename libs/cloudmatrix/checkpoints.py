"""Loading a checkpoint as the model to run: float or INT8 W8A8 (its config.json says which), at
a serving precision. It sits above ``model/`` (the float model and its files) and ``quant/``
(INT8), which know nothing of each other's loaders.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cloudmatrix.model.checkpoint import load_float_model
from cloudmatrix.model.precision import Precision
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.quant.calibrate import checkpoint_calibration_prompts
from cloudmatrix.quant.int8_checkpoint import is_int8_checkpoint, load_int8_model
from cloudmatrix.quant.linear import Int8Linear
from cloudmatrix.quant.quantize_model import QuantSettings, quantize_model


def load_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, mtp: bool = False) -> DeepseekV3:
    """The checkpoint's model, every weight present. Float weights stored in another dtype (the
    shipped checkpoint is bf16) are cast to ``dtype``; with ``mtp`` the MTP module is loaded too.
    An INT8 (W8A8) checkpoint, marked by its config.json quantization_config, loads as Int8Linear
    layers with fp32 float parts, so it takes no other dtype."""
    if is_int8_checkpoint(checkpoint_dir):
        if dtype != torch.float32:
            raise ValueError(f"{checkpoint_dir} is an INT8 checkpoint; it loads with dtype float32 only, not {dtype}")
        return load_int8_model(checkpoint_dir, mtp=mtp)
    return load_float_model(checkpoint_dir, dtype, mtp)


def is_int8(model: DeepseekV3) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def load_for_precision(checkpoint_dir: str | Path, precision: Precision, mtp: bool = False) -> DeepseekV3:
    """Load a checkpoint to run at ``precision``.

    An fp32 checkpoint asked to run in INT8 is quantized in memory with the default settings
    (as `cmx quantize` would); an INT8 checkpoint cannot run as fp32.
    """
    model = load_model(checkpoint_dir, mtp=mtp)
    if precision.int8_weights and not is_int8(model):
        settings = QuantSettings()
        prompts = checkpoint_calibration_prompts(checkpoint_dir, model.cfg.vocab_size, settings.calib_samples,
                                                 settings.calib_seq_len, settings.seed)
        quantize_model(model, prompts, settings)
    elif not precision.int8_weights and is_int8(model):
        raise ValueError(f"{checkpoint_dir} is an INT8 checkpoint; precision {precision.name!r} needs float weights")
    model.attention.core = precision.attention_core
    return model
