"""decode configuration: one frozen dataclass, from YAML + env (CMX_DECODE__...) + --set."""
from __future__ import annotations

import dataclasses

from cloudmatrix.config import ServerConfig
from cloudmatrix.errors import FieldError
from cloudmatrix.instance.settings import InstanceSettings


@dataclasses.dataclass(frozen=True)
class DecodeConfig(InstanceSettings):
    """The instance settings (kvcache required: every prompt's KV comes from the pool) plus
    decode's pipelining."""

    server: ServerConfig = dataclasses.field(default_factory=lambda: ServerConfig(service_name="decode"))
    instance_id: str = "decode-0"
    microbatches: int = 1                # 2 = two-microbatch pipelining of each decode step

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.kvcache:
            raise FieldError("kvcache", "decode reads every prompt's KV from the pool; list its shards")
        if self.microbatches not in (1, 2):
            raise FieldError("microbatches", f"must be 1 or 2, got {self.microbatches}")
