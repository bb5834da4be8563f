"""Build the model one die of an expert-parallel instance runs: every non-expert weight, and only
the routed experts the placement gives this die."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.model.checkpoint import read_state_dict
from cloudmatrix.model.config import load_config
from cloudmatrix.model.precision import Precision
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.moe.expert_parallel import Exchange, ExpertParallelMoE
from cloudmatrix.moe.placement import ExpertPlacement
from cloudmatrix.quant.int8_checkpoint import is_int8_checkpoint
from cloudmatrix.quant.quantize_model import swap_to_int8

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def _is_local(placement: ExpertPlacement, die: int):
    def keep(key: str) -> bool:
        match = _EXPERT_KEY.match(key)
        return not match or die in placement.replicas[int(match.group(1))][int(match.group(2))]
    return keep


def die_expert_filter(placement: ExpertPlacement, die: int):
    """key -> whether this die holds the tensor (non-expert tensors: always)."""
    return _is_local(placement, die)


def needs_in_memory_quantization(checkpoint_dir: str | Path, precision: Precision) -> bool:
    return precision.int8_weights and not is_int8_checkpoint(checkpoint_dir)


def _die_state(checkpoint_dir: Path, precision: Precision, placement: ExpertPlacement, die: int,
               state: dict[str, torch.Tensor] | None, mtp: bool):
    """The tensors this die holds: from ``state`` (already fetched, e.g. from the model cache) or
    the checkpoint. A float checkpoint served in INT8 is quantized in memory first (calibration
    needs the whole model), then cut down to this die's experts."""
    keep = _is_local(placement, die)
    cfg = load_config(checkpoint_dir)
    if state is not None:
        return {k: v if v.dtype == torch.int8 else v.float() for k, v in state.items() if keep(k)}
    if needs_in_memory_quantization(checkpoint_dir, precision):
        full = load_for_precision(checkpoint_dir, precision, mtp=mtp).state_dict()
        return {k: v for k, v in full.items() if keep(_checkpoint_key(k, cfg))}
    if not precision.int8_weights and is_int8_checkpoint(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} is an INT8 checkpoint; precision {precision.name!r} needs float weights")
    return {k: v if v.dtype == torch.int8 else v.float()
            for k, v in read_state_dict(checkpoint_dir, cfg, keep, mtp=mtp).items()}


def _checkpoint_key(key: str, cfg) -> str:
    """The in-memory key of the MTP module (``mtp.0.``) as the checkpoint names it."""
    return f"model.layers.{cfg.num_hidden_layers}." + key[len("mtp.0."):] if key.startswith("mtp.0.") else key


def build_die_model(checkpoint_dir: str | Path, precision: Precision, placement: ExpertPlacement,
                    exchange: Exchange, dispatch_dtype: str, state: dict[str, torch.Tensor] | None = None,
                    mtp: bool = False) -> DeepseekV3:
    """The die's model: MoE layers are ExpertParallelMoE over ``exchange`` (with ``mtp``, the MTP
    module's too); weights loaded strictly from the checkpoint, or from ``state`` when the caller
    fetched them (the model cache)."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg = load_config(checkpoint_dir)
    moe_layers = cfg.moe_layers(mtp)
    if placement.layers != moe_layers or placement.num_experts != cfg.n_routed_experts:
        raise ValueError(f"placement covers layers {placement.layers} x {placement.num_experts} experts; "
                         f"the model has MoE layers {moe_layers} x {cfg.n_routed_experts} experts")
    model = DeepseekV3(cfg, moe=lambda c, layer: ExpertParallelMoE(c, layer, placement, exchange, dispatch_dtype),
                       mtp=mtp)
    state = _die_state(checkpoint_dir, precision, placement, exchange.die_id, state, mtp)
    swap_to_int8(model, [k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")])
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"die {exchange.die_id}: checkpoint does not fit the die model: missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    model.attention.core = precision.attention_core
    return model.eval()


def default_dispatch_dtype(precision: Precision) -> str:
    return "int8" if precision.int8_weights else "float32"
