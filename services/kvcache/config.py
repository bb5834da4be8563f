"""kvcache configuration: one frozen dataclass, from YAML + env (CMX_KVCACHE__...) + --set."""
from __future__ import annotations

import dataclasses
import math
import os

from cloudmatrix.config import ServerConfig
from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.discovery import parse_sources


@dataclasses.dataclass(frozen=True)
class KvCacheConfig:
    server: ServerConfig = dataclasses.field(default_factory=lambda: ServerConfig(service_name="kvcache"))
    capacity_bytes: int = 256 * 2**20        # memory tier: block data bytes held in RAM
    max_block_bytes: int = 16 * 2**20        # largest block data a Put may carry
    disk_dir: str | None = None              # disk tier directory; None = no disk tier
    disk_capacity_bytes: int = 4 * 2**30     # disk tier: block data bytes in disk_dir
    disk_write_through: bool = False         # also write every stored block to disk before acking
                                             # the Put (default: blocks reach disk when evicted)
    disk_fsync: bool = False                 # fsync each disk-tier file and its directory: survives a
                                             # power loss, ~2 syncs per block (default: crash-safe only)
    max_lease_s: float = 600.0               # a lease's ttl is capped at this
    blob_dir: str | None = None              # where blobs persist; None = <disk_dir>/blobs, or memory only
    members: tuple[str, ...] = ()            # where the pool's shards are found (rpc/discovery.py:
                                             # dns:///kvcache:50051, ready:<run_dir>/ready/kvcache);
                                             # () = no membership: this shard never moves blocks
    advertise: str = ""                      # this shard's name on the ring; "" = its host:port
    replication: int = 2                     # the pool's replicas per block (as its instances')
    membership_interval_s: float = 2.0       # how often the members are looked up again
    leave_after_s: float = 30.0              # a member not found for this long has left the pool

    def __post_init__(self) -> None:
        if self.capacity_bytes < 1:
            raise FieldError("capacity_bytes", f"must be >= 1, got {self.capacity_bytes}")
        if self.max_block_bytes < 1:
            raise FieldError("max_block_bytes", f"must be >= 1, got {self.max_block_bytes}")
        if self.max_block_bytes >= self.server.max_message_bytes:
            raise FieldError("max_block_bytes", "must be below server.max_message_bytes "
                             f"({self.server.max_message_bytes}), got {self.max_block_bytes}")
        if self.disk_capacity_bytes < 1:
            raise FieldError("disk_capacity_bytes", f"must be >= 1, got {self.disk_capacity_bytes}")
        if not (self.max_lease_s > 0 and math.isfinite(self.max_lease_s)):
            raise FieldError("max_lease_s", f"must be a finite number > 0, got {self.max_lease_s}")
        object.__setattr__(self, "members", parse_sources(self.members, "members"))
        if self.members and not self.advertise and self.server.host in ("0.0.0.0", "::", ""):
            raise FieldError("advertise", "a shard listening on every interface must say its name on the "
                             "ring, e.g. $(POD_NAME).kvcache:50051")
        if self.replication < 1:
            raise FieldError("replication", f"must be >= 1, got {self.replication}")
        for name in ("membership_interval_s", "leave_after_s"):
            if not getattr(self, name) > 0:
                raise FieldError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("disk_dir", "blob_dir"):
            if getattr(self, name) == "":
                raise FieldError(name, "must be a directory path or none, got an empty string")

    @property
    def resolved_blob_dir(self) -> str | None:
        """Where blobs persist: blob_dir, else <disk_dir>/blobs, else None (memory only)."""
        if self.blob_dir is not None:
            return self.blob_dir
        return os.path.join(self.disk_dir, "blobs") if self.disk_dir is not None else None
