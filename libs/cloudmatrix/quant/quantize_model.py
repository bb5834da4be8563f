"""W8A8 for a whole DeepseekV3: which linears, the handler that builds the quantized state dict,
and the module swap.

Mixed precision. Quantized: q_a_proj / q_b_proj (or q_proj), kv_a_proj_with_mqa, o_proj, the dense
MLP and every routed / shared expert's gate_proj, up_proj, down_proj. Kept in float:

* ``mlp.gate`` (the router, not an nn.Linear): expert choice is a top-k over close sigmoid scores,
  so small errors flip experts; it is tiny;
* ``self_attn.kv_b_proj``: the absorbed MLA decode folds its W_UK half into the query and its W_UV
  half into the output, multiplying them with other float tensors, so it needs the float weight;
* ``lm_head``, ``embed_tokens`` and every RMSNorm (cheap, and precision-critical).

Linears that read the same tensor share one smoothing vector (one "smoothing group"): q_a_proj with
kv_a_proj_with_mqa, gate_proj with up_proj, and in an MoE layer the gate/up projections of all
routed experts and the shared expert. The MoE group is what makes early quantization possible:
a token is quantized once on its own die, before dispatch, and every expert it reaches multiplies
the same int8 row.
"""
from __future__ import annotations

import dataclasses
import re
import time

import torch
from torch import nn

from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.quant.calibrate import LinearStats, collect_stats
from cloudmatrix.quant.linear import Int8Linear, int8_linear_state
from cloudmatrix.quant.primitives import QMAX
from cloudmatrix.quant.smooth import (
    CLIP_GRID,
    DEFAULT_ALPHA,
    search_clip,
    smoothing_factors,
)

# nn.Linear modules (name suffixes) that stay in float; see the module docstring for why.
FLOAT_LINEARS = ("lm_head", "self_attn.kv_b_proj")
# Routers stay float too; they are not nn.Linear but are listed in the checkpoint's config.
_ROUTER = re.compile(r"\.mlp\.gate$")
# Linears reading the same input tensor -> the name of that input (their smoothing group).
_SHARED_INPUTS = (
    (re.compile(r"^(.*\.self_attn)\.(q_a_proj|q_proj|kv_a_proj_with_mqa)$"), r"\1.input"),
    (re.compile(r"^(.*\.mlp)(\.experts\.\d+|\.shared_experts)?\.(gate_proj|up_proj)$"), r"\1.input"),
)


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    """How to quantize: smoothing alpha, clipping, and the calibration set."""

    alpha: float = DEFAULT_ALPHA
    smooth: bool = True
    clip: bool = True
    clip_block: int = 1
    calib_samples: int = 16
    calib_seq_len: int = 64
    sample_cap: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.calib_samples < 1 or self.sample_cap < 1 or self.clip_block < 1:
            raise ValueError("calib_samples, sample_cap and clip_block must be >= 1")


@dataclasses.dataclass(frozen=True)
class QuantReport:
    quantized: int
    kept_float: int
    bytes_before: int
    bytes_after: int
    calibration_tokens: int
    clipped_channels: float  # fraction of output channels whose clip ratio is < 1
    seconds: float


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules W8A8 replaces, in module order."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not n.endswith(FLOAT_LINEARS)]


def float_matmuls(model: nn.Module) -> list[str]:
    """Names of the matmul modules kept in float (the config's ``modules_not_converted``)."""
    return [n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) and n.endswith(FLOAT_LINEARS)) or _ROUTER.search(n)]


def smoothing_group(name: str) -> str:
    """The input a linear reads: equal for linears that must share one smoothing vector."""
    for pattern, replacement in _SHARED_INPUTS:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return name


def quantize_state_dict(model: nn.Module, stats: dict[str, LinearStats],
                        settings: QuantSettings) -> dict[str, torch.Tensor]:
    """The handler: the model's state dict with every calibrated linear replaced by Int8Linear buffers."""
    state = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in stats}
    groups: dict[str, list[str]] = {}
    for name in stats:
        groups.setdefault(smoothing_group(name), []).append(name)
    for members in groups.values():
        weights = [model.get_submodule(n).weight.detach().float() for n in members]
        smooth = _group_smoothing(members, weights, stats, settings)
        for name, w in zip(members, weights):
            clip = _clip_ratios(w, smooth, stats[name], settings)
            for key, tensor in int8_linear_state(w, smooth, clip).items():
                state[f"{name}.{key}"] = tensor
    return state


def _group_smoothing(members, weights, stats, settings) -> torch.Tensor | None:
    if not settings.smooth:
        return None
    x_amax = torch.stack([stats[n].x_amax for n in members]).amax(dim=0)  # [K]
    return smoothing_factors(x_amax, weights, settings.alpha)


def _clip_ratios(w, smooth, stats: LinearStats, settings: QuantSettings) -> torch.Tensor | None:
    # An expert that no calibration token reached has no data to choose by: no clipping.
    if not settings.clip or stats.sample.shape[0] == 0:
        return None
    x = stats.sample if smooth is None else stats.sample / smooth
    return search_clip(x, w if smooth is None else w * smooth, settings.clip_block, CLIP_GRID)


def swap_to_int8(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace each named nn.Linear by an (empty) Int8Linear of the same shape, in place."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear) or old.bias is not None:
            raise ValueError(f"{name} is not a bias-free nn.Linear of this model; cannot hold int8 weights")
        setattr(parent, child, Int8Linear(old.in_features, old.out_features))
    return model


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def quantize_model(model: DeepseekV3, prompts: torch.Tensor, settings: QuantSettings) -> QuantReport:
    """Calibrate on prompts [N, S], build the quantized state dict, swap the modules (in place)."""
    start = time.perf_counter()
    names = quantizable_linears(model)
    bytes_before = state_bytes(model.state_dict())
    stats = collect_stats(model, names, prompts, settings.sample_cap, settings.seed)
    with torch.no_grad():
        state = quantize_state_dict(model, stats, settings)
        clipped = _clipped_fraction(model, names, state)
    swap_to_int8(model, names).load_state_dict(state, strict=True)
    return QuantReport(
        quantized=len(names), kept_float=len(float_matmuls(model)), bytes_before=bytes_before,
        bytes_after=state_bytes(state), calibration_tokens=prompts.numel(),
        clipped_channels=clipped, seconds=time.perf_counter() - start,
    )


def _clipped_fraction(model: nn.Module, names: list[str], state: dict[str, torch.Tensor]) -> float:
    # A channel is clipped when its int8 range covers less than max|w * smooth| (ratio < 1).
    clipped = total = 0
    for n in names:
        w = model.get_submodule(n).weight.float() * state[f"{n}.smooth_scale"]  # [N, K]
        ratio = state[f"{n}.weight_scale"] * QMAX / w.abs().amax(dim=1).clamp_min(1e-30)
        clipped += int((ratio < 0.999).sum())
        total += ratio.numel()
    return clipped / total
