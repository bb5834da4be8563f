"""prefill configuration: one frozen dataclass, from YAML + env (CMX_PREFILL__...) + --set."""
from __future__ import annotations

import dataclasses

from cloudmatrix.config import ServerConfig
from cloudmatrix.instance.settings import InstanceSettings


@dataclasses.dataclass(frozen=True)
class PrefillConfig(InstanceSettings):
    """The instance settings (kvcache () = no context caching) plus prefill's batching."""

    server: ServerConfig = dataclasses.field(default_factory=lambda: ServerConfig(service_name="prefill"))
    instance_id: str = "prefill-0"
    chunk_tokens: int = 256              # chunked prefill: a request's tokens per step
    max_step_tokens: int = 1024          # tokens of all requests packed into one step

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.chunk_tokens, self.max_step_tokens) < 1:
            raise ValueError("chunk_tokens and max_step_tokens must be >= 1")
