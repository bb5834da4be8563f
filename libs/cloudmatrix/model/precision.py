"""Serving precisions: which weights (fp32 or INT8 W8A8) and which attention core (fp32 or PASA).

| name      | GEMMs               | attention core                 |
|-----------|---------------------|--------------------------------|
| fp32      | fp32                | exact fp32 softmax             |
| int8      | INT8 W8A8           | exact fp32 softmax             |
| pasa      | fp32                | PASA, fp16 throughout          |
| int8-pasa | INT8 W8A8           | PASA, fp16 throughout (paper)  |
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cloudmatrix.model.checkpoint import load_model
from cloudmatrix.model.transformer import DeepseekV3


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    int8_weights: bool
    attention_core: str


PRECISIONS = {
    "fp32": Precision("fp32", False, "fp32"),
    "int8": Precision("int8", True, "fp32"),
    "pasa": Precision("pasa", False, "pasa"),
    "int8-pasa": Precision("int8-pasa", True, "pasa"),
}


def parse_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def is_int8(model: DeepseekV3) -> bool:
    from cloudmatrix.quant.linear import Int8Linear
    return any(isinstance(m, Int8Linear) for m in model.modules())


def load_for_precision(checkpoint_dir: str | Path, precision: Precision) -> DeepseekV3:
    """Load a checkpoint to run at ``precision``.

    An fp32 checkpoint asked to run in INT8 is quantized in memory with the default settings
    (as `cmx quantize` would); an INT8 checkpoint cannot run as fp32.
    """
    model = load_model(checkpoint_dir)
    if precision.int8_weights and not is_int8(model):
        from cloudmatrix.quant.calibrate import checkpoint_calibration_prompts
        from cloudmatrix.quant.quantize_model import QuantSettings, quantize_model
        settings = QuantSettings()
        prompts = checkpoint_calibration_prompts(checkpoint_dir, model.cfg.vocab_size, settings.calib_samples,
                                                 settings.calib_seq_len, settings.seed)
        quantize_model(model, prompts, settings)
    elif not precision.int8_weights and is_int8(model):
        raise ValueError(f"{checkpoint_dir} is an INT8 checkpoint; precision {precision.name!r} needs float weights")
    model.attention.core = precision.attention_core
    return model
