"""ub_fabric configuration: one frozen dataclass, from YAML + env (CMX_UB_FABRIC__...) + --set."""
from __future__ import annotations

import dataclasses

from cloudmatrix.config import ServerConfig
from cloudmatrix.errors import FieldError


@dataclasses.dataclass(frozen=True)
class UbFabricConfig:
    server: ServerConfig = dataclasses.field(default_factory=lambda: ServerConfig(service_name="ub_fabric"))
    hello_timeout_s: float = 10.0   # an Attach stream must send its Hello within this time

    def __post_init__(self) -> None:
        if self.hello_timeout_s <= 0:
            raise FieldError("hello_timeout_s", f"must be > 0, got {self.hello_timeout_s}")
