"""prefill configuration: one frozen dataclass, from YAML + env (CMX_PREFILL__...) + --set."""
from __future__ import annotations

import dataclasses

from cloudmatrix.config import ServerConfig
from cloudmatrix.errors import FieldError
from cloudmatrix.instance.settings import InstanceSettings


@dataclasses.dataclass(frozen=True)
class PrefillConfig(InstanceSettings):
    """The instance settings (kvcache () = no context caching) plus the handoff lease. Prefill
    packs larger steps than decode (the paper batches 16K tokens per NPU), and an idle prefill
    waits for a burst of prompts to finish arriving: a burst is prefilled together and reaches
    decode together."""

    server: ServerConfig = dataclasses.field(default_factory=lambda: ServerConfig(service_name="prefill"))
    instance_id: str = "prefill-0"
    max_step_tokens: int = 4096
    batch_wait_s: float = 0.01
    kv_lease_ttl_s: float = 60.0         # the prompt's pool blocks stay pinned this long for the decode

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_lease_ttl_s <= 0:
            raise FieldError("kv_lease_ttl_s", f"must be > 0, got {self.kv_lease_ttl_s}")
