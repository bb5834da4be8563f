"""gateway configuration: one frozen dataclass, from YAML + env (CMX_GATEWAY__...) + --set."""
from __future__ import annotations

import dataclasses

from cloudmatrix.config import ServerConfig
from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.discovery import parse_sources


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig = dataclasses.field(default_factory=lambda: ServerConfig(service_name="gateway"))
    http_host: str = "127.0.0.1"         # the OpenAI-compatible HTTP API
    http_port: int = 0                   # 0 = any free port (written to <run_dir>/ready/<name>.http.json)
    checkpoint: str = ""                 # checkpoint directory: tokenizer and model limits
    model_id: str = ""                   # "" = the checkpoint directory's name
    prefill: tuple[str, ...] = ()        # prefill instances: addresses ({first..last} ranges),
                                         # dns:///<service>:<port>, ready:<dir>/<entry> (rpc/discovery.py)
    decode: tuple[str, ...] = ()         # decode instances, the same; found again every second,
                                         # those that do not answer are left out
    max_in_flight: int = 64              # requests running at once
    max_queue: int = 256                 # requests waiting for a slot; beyond, RESOURCE_EXHAUSTED / 429
    request_timeout_s: float = 300.0     # deadline of a whole request, every outbound call included
    api_keys: tuple[str, ...] = ()       # accepted bearer keys; () = no authentication

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefill", parse_sources(self.prefill, "prefill"))
        object.__setattr__(self, "decode", parse_sources(self.decode, "decode"))
        if not self.checkpoint:
            raise FieldError("checkpoint", "must name the checkpoint directory (tokenizer, model limits)")
        if not self.prefill:
            raise FieldError("prefill", "must list at least one prefill instance address")
        if not self.decode:
            raise FieldError("decode", "must list at least one decode instance address")
        if not 0 <= self.http_port <= 65535:
            raise FieldError("http_port", f"must be in [0, 65535], got {self.http_port}")
        if self.max_in_flight < 1:
            raise FieldError("max_in_flight", f"must be >= 1, got {self.max_in_flight}")
        if self.max_queue < 0:
            raise FieldError("max_queue", f"must be >= 0, got {self.max_queue}")
        if not self.request_timeout_s > 0:
            raise FieldError("request_timeout_s", f"must be > 0, got {self.request_timeout_s}")
        if any(not key for key in self.api_keys):
            raise FieldError("api_keys", "keys must be non-empty strings")
