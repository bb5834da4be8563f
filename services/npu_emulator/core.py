"""One emulated Ascend 910C die, free of gRPC: identity, HBM, the loaded engine, and the kernels
RunKernel exposes (see services/npu_emulator/kernels.py)."""
from __future__ import annotations

import dataclasses
import time

import torch

from cloudmatrix.costmodel.die import ASCEND_910C_DIE
from cloudmatrix.errors import FieldError
from services.npu_emulator.engine import DieEngine
from services.npu_emulator.kernels import KERNELS, kernel_modeled_s


@dataclasses.dataclass(frozen=True)
class KernelResult:
    outputs: dict[str, torch.Tensor]
    measured_s: float
    modeled_s: float


@dataclasses.dataclass(frozen=True)
class DieIdentity:
    die_id: int
    num_dies: int
    hbm_capacity_bytes: int = ASCEND_910C_DIE.hbm_bytes


class Die:
    """The die's state and operations; the servicer only translates protos."""

    def __init__(self, identity: DieIdentity) -> None:
        self.identity = identity
        self.engine: DieEngine | None = None
        self.model_id = ""
        self.precision = ""

    def unload(self) -> None:
        """Drop the model and its KV pool; leave the fabric."""
        if self.engine is not None:
            close = getattr(self.engine.link, "close", None)
            if close is not None:
                close()
        self.engine, self.model_id, self.precision = None, "", ""

    def install(self, engine: DieEngine, model_id: str, precision: str) -> None:
        self.engine, self.model_id, self.precision = engine, model_id, precision

    def num_local_experts(self) -> int:
        if self.engine is None:
            return 0
        return sum(len(getattr(layer.mlp, "experts", ())) for layer in self.engine.model.model.layers
                   if self.engine.model.cfg.is_moe_layer(layer.layer))

    def run_kernel(self, name: str, inputs: dict[str, torch.Tensor], params: dict[str, str]) -> KernelResult:
        if name not in KERNELS:
            raise FieldError("kernel", f"unknown kernel {name!r}; available: {', '.join(sorted(KERNELS))}")
        start = time.perf_counter()
        outputs = KERNELS[name](inputs, params)
        measured = time.perf_counter() - start
        return KernelResult(outputs, measured, kernel_modeled_s(name, inputs, params))
