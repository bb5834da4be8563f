"""One emulated Ascend 910C die, free of gRPC: identity, HBM capacity, and the kernels it runs."""
from __future__ import annotations

import dataclasses
import time

import torch
from cloudmatrix.costmodel.die import ASCEND_910C_DIE, gemm_modeled_s
from cloudmatrix.kernels.fp16 import cube_matmul


@dataclasses.dataclass(frozen=True)
class KernelResult:
    outputs: dict[str, torch.Tensor]
    measured_s: float
    modeled_s: float


def _gemm_inputs(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    missing = {"a", "b"} - inputs.keys()
    if missing:
        raise ValueError(f"gemm: missing inputs {sorted(missing)} (needs a: [M, K], b: [K, N])")
    a, b = inputs["a"], inputs["b"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: inputs a {list(a.shape)} and b {list(b.shape)} must be [M, K] and [K, N]")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"gemm: inputs must be floating point, got a {a.dtype} and b {b.dtype}")
    return a.float(), b.float()


def run_gemm(inputs: dict[str, torch.Tensor], params: dict[str, str]) -> dict[str, torch.Tensor]:
    """params.precision: 'fp32' (exact fp32 GEMM) or 'fp16' (the cube unit, emulated)."""
    a, b = _gemm_inputs(inputs)
    precision = params.get("precision", "fp16")
    if precision == "fp16":
        return {"out": cube_matmul(a, b).to(torch.float16)}
    if precision == "fp32":
        return {"out": a @ b}
    raise ValueError(f"gemm: params.precision must be 'fp16' or 'fp32', got {precision!r}")


KERNELS = {"gemm": run_gemm}


@dataclasses.dataclass(frozen=True)
class DieIdentity:
    die_id: int
    num_dies: int
    hbm_capacity_bytes: int = ASCEND_910C_DIE.hbm_bytes


class Die:
    """The die's state and operations; the servicer only translates protos."""

    def __init__(self, identity: DieIdentity) -> None:
        self.identity = identity

    def run_kernel(self, name: str, inputs: dict[str, torch.Tensor], params: dict[str, str]) -> KernelResult:
        if name not in KERNELS:
            raise ValueError(f"kernel: unknown kernel {name!r}; available: {', '.join(sorted(KERNELS))}")
        start = time.perf_counter()
        outputs = KERNELS[name](inputs, params)
        measured = time.perf_counter() - start
        return KernelResult(outputs, measured, _modeled_s(name, inputs, outputs))


def _modeled_s(name: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> float:
    if name == "gemm":
        (m, k), n = inputs["a"].shape, inputs["b"].shape[1]
        return gemm_modeled_s(m, k, n, elem_bytes=2)
    raise AssertionError(f"no cost model for kernel {name}")
