"""Kernels a die runs on demand (RunKernel): GEMMs on the emulated cube unit, INT8 W8A8, PASA."""
from __future__ import annotations

import torch

from cloudmatrix.costmodel.ops import gemm_s, mla_attention_s
from cloudmatrix.errors import FieldError
from cloudmatrix.kernels.fp16 import cube_matmul
from cloudmatrix.kernels.pasa import MODES, flash_attention
from cloudmatrix.quant.primitives import int8_matmul


def _require(inputs: dict[str, torch.Tensor], kernel: str, names: tuple[str, ...], usage: str) -> list[torch.Tensor]:
    missing = sorted(set(names) - inputs.keys())
    if missing:
        raise FieldError("inputs", f"{kernel}: missing inputs {missing} (needs {usage})")
    return [inputs[n] for n in names]


def run_gemm(inputs: dict[str, torch.Tensor], params: dict[str, str]) -> dict[str, torch.Tensor]:
    """a: [M, K], b: [K, N]; params.precision 'fp16' (the cube unit, emulated; default) or 'fp32'."""
    a, b = _require(inputs, "gemm", ("a", "b"), "a: [M, K], b: [K, N]")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise FieldError("inputs", f"gemm: a {list(a.shape)} and b {list(b.shape)} must be [M, K] and [K, N]")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise FieldError("inputs", f"gemm: must be floating point, got a {a.dtype} and b {b.dtype}")
    precision = params.get("precision", "fp16")
    if precision == "fp16":
        return {"out": cube_matmul(a.float(), b.float()).to(torch.float16)}
    if precision == "fp32":
        return {"out": a.float() @ b.float()}
    raise FieldError("params.precision", f"gemm: must be 'fp16' or 'fp32', got {precision!r}")


def run_int8_gemm(inputs: dict[str, torch.Tensor], params: dict[str, str]) -> dict[str, torch.Tensor]:
    """a: int8 [M, K], b: int8 [N, K] -> out: int32 [M, N] (exact)."""
    a, b = _require(inputs, "int8_gemm", ("a", "b"), "a: int8 [M, K], b: int8 [N, K]")
    return {"out": int8_matmul(a, b)}


def run_pasa_attention(inputs: dict[str, torch.Tensor], params: dict[str, str]) -> dict[str, torch.Tensor]:
    """q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv]; params: mode (pasa), causal (false), scale."""
    q, k, v = _require(inputs, "pasa_attention", ("q", "k", "v"), "q, k, v as [B, H, S, D]")
    mode = params.get("mode", "pasa")
    if mode not in MODES:
        raise FieldError("params.mode", f"pasa_attention: must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        scale = float(params.get("scale", q.shape[-1] ** -0.5))
    except ValueError as exc:
        raise FieldError("params.scale", f"pasa_attention: not a number: {params['scale']!r}") from exc
    causal = params.get("causal", "false").lower() in ("1", "true", "yes")
    return {"out": flash_attention(q.float(), k.float(), v.float(), scale=scale, mode=mode, causal=causal).float()}


KERNELS = {"gemm": run_gemm, "int8_gemm": run_int8_gemm, "pasa_attention": run_pasa_attention}


def kernel_modeled_s(name: str, inputs: dict[str, torch.Tensor], params: dict[str, str]) -> float:
    """Modeled 910C seconds of a kernel call, from the cost model (docs/costmodel.md)."""
    if name == "gemm":
        (m, k), n = inputs["a"].shape, inputs["b"].shape[1]
        return gemm_s(m, k, n, dtype="fp16")
    if name == "int8_gemm":
        (m, k), n = inputs["a"].shape, inputs["b"].shape[0]
        return gemm_s(m, k, n, dtype="int8")
    q, k, v = inputs["q"], inputs["k"], inputs["v"]  # priced as causal MLA-style attention, per batch row
    b, heads, sq, d = q.shape
    return mla_attention_s([sq] * b, [k.shape[2]] * b, heads, d, v.shape[3], d, absorbed=False, dtype="fp16")
