"""npu_emulator configuration: one frozen dataclass, from YAML + env (CMX_NPU_EMULATOR__...) + --set."""
from __future__ import annotations

import dataclasses

from cloudmatrix.config import ServerConfig
from cloudmatrix.costmodel.die import ASCEND_910C_DIE
from cloudmatrix.errors import FieldError


@dataclasses.dataclass(frozen=True)
class NpuEmulatorConfig:
    server: ServerConfig = dataclasses.field(default_factory=lambda: ServerConfig(service_name="npu_emulator"))
    die_id: int = 0                                  # rank of this die within its instance
    num_dies: int = 1                                # dies in the instance (the EP world size)
    hbm_bytes: int = ASCEND_910C_DIE.hbm_bytes      # emulated HBM capacity
    threads: int = 1                                 # torch intra-op threads for this process
    kv_block_size: int = 16                          # tokens per KV block unless LoadModel says
    kv_pool_bytes: int = 64 * 2**20                  # KV pool size unless LoadModel says (real RAM here)
    round_timeout_s: float = 10.0                    # a dispatch/combine round fails after this
    fabric_connect_timeout_s: float = 60.0           # LoadModel waits this long for the EP group
    fail_forwards: tuple[int, ...] = ()              # a fault hook for tests: these Forward calls of this
                                                     # die (1 = its first) raise TypeError, as a bug would

    def __post_init__(self) -> None:
        if self.num_dies < 1:
            raise FieldError("num_dies", f"must be >= 1, got {self.num_dies}")
        if not 0 <= self.die_id < self.num_dies:
            raise FieldError("die_id", f"must be in [0, num_dies={self.num_dies}), got {self.die_id}")
        if self.hbm_bytes <= 0:
            raise FieldError("hbm_bytes", f"must be > 0, got {self.hbm_bytes}")
        if self.kv_block_size < 1 or self.kv_pool_bytes < 1:
            raise ValueError("kv_block_size and kv_pool_bytes must be >= 1")
        if self.round_timeout_s <= 0 or self.fabric_connect_timeout_s <= 0:
            raise ValueError("round_timeout_s and fabric_connect_timeout_s must be > 0")
        if any(n < 1 for n in self.fail_forwards):
            raise FieldError("fail_forwards", f"call numbers start at 1, got {self.fail_forwards}")
        if self.threads < 1:
            raise FieldError("threads", f"must be >= 1, got {self.threads}")
