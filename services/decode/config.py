"""decode configuration: one frozen dataclass, from YAML + env (CMX_DECODE__...) + --set."""
from __future__ import annotations

import dataclasses

from cloudmatrix.config import ServerConfig
from cloudmatrix.model.precision import PRECISIONS


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    server: ServerConfig = dataclasses.field(default_factory=lambda: ServerConfig(service_name="decode"))
    instance_id: str = "decode-0"
    checkpoint: str = ""                 # HF checkpoint directory the dies load
    model_id: str = ""                   # "" = the checkpoint directory's name
    precision: str = "fp32"
    dies: tuple[str, ...] = ()           # npu_emulator addresses this instance drives
    fabric: str = ""                     # ub_fabric address (needed for more than one die)
    kvcache: tuple[str, ...] = ()        # kvcache shard addresses holding the prompts' KV
    replication: int = 2                 # pool replicas per block (capped at the shard count)
    block_size: int = 16                 # tokens per KV block (die pool and pool keys)
    max_running: int = 64                # requests in the running batch; more wait in a queue
    max_waiting: int = 256               # beyond this, RESOURCE_EXHAUSTED
    microbatches: int = 1                # 2 = two-microbatch pipelining of each decode step
    rpc_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint: must name the checkpoint directory the dies load")
        if not self.kvcache:
            raise ValueError("kvcache: decode reads every prompt's KV from the pool; list its shards")
        if not self.dies:
            raise ValueError("dies: must list at least one npu_emulator address")
        if len(self.dies) > 1 and not self.fabric:
            raise ValueError("fabric: needed when the instance has more than one die")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.microbatches not in (1, 2):
            raise ValueError(f"microbatches: must be 1 or 2, got {self.microbatches}")
        if min(self.block_size, self.max_running, self.replication) < 1 or self.max_waiting < 0:
            raise ValueError("block_size, max_running and replication must be >= 1, max_waiting >= 0")
