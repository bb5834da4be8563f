"""The settings every instance service (prefill, decode) shares: which model, which dies, which
fabric and pool, and how its scheduler batches. Service configs extend it; nothing below main()
reads the environment."""
from __future__ import annotations

import dataclasses

from cloudmatrix.errors import FieldError
from cloudmatrix.instance.loop import LoopSettings
from cloudmatrix.instance.scheduler import SchedulerLimits
from cloudmatrix.model.config import load_config
from cloudmatrix.model.precision import PRECISIONS
from cloudmatrix.rpc.addresses import expand_addresses
from cloudmatrix.rpc.discovery import parse_sources


@dataclasses.dataclass(frozen=True)
class InstanceSettings:
    checkpoint: str = ""                 # HF checkpoint directory the dies load
    model_id: str = ""                   # "" = the checkpoint directory's name
    precision: str = "fp32"
    dies: tuple[str, ...] = ()           # npu_emulator addresses this instance drives ({first..last}
                                         # ranges: rpc/addresses.py)
    fabric: str = ""                     # ub_fabric address (needed for more than one die)
    kvcache: tuple[str, ...] = ()        # kvcache shards: addresses, or where the pool's members are
                                         # found (dns:///kvcache:50051, ready:<dir>/kvcache)
    replication: int = 2                 # pool replicas per block (capped at the shard count)
    pool_refresh_s: float = 2.0          # members found again this often (dynamic kvcache sources)
    pool_leave_after_s: float = 30.0     # a member not found for this long has left the pool
    model_cache: bool = False            # dies load weights through the pool (the paper's EMS model
                                         # cache; the first loader publishes them): a restarted die reloads
                                         # from pooled memory instead of the checkpoint's disk
    block_size: int = 16                 # tokens per KV block (die pool and pool keys)
    kv_blocks_per_die: int = 0           # KV blocks the scheduler uses on each die; 0 = the die's whole pool
    max_running: int = 64                # requests holding KV blocks and stepping; more wait
    max_waiting: int = 256               # beyond this, RESOURCE_EXHAUSTED
    chunk_tokens: int = 256              # a request's tokens per step (chunked prefill, recompute)
    speculative_tokens: int | None = None  # MTP draft tokens verified per decode step: 0 or 1;
                                         # None = 1 when the checkpoint has an MTP module, else 0
    max_step_tokens: int = 1024          # tokens of all requests packed into one step
    batch_wait_s: float = 0.0            # an idle instance's first step waits until no request has
                                         # arrived for this long (at most 10x it): a burst lands in one step
    rpc_timeout_s: float = 120.0         # deadline of every call to a die
    probe_interval_s: float = 1.0        # die health probes (and recovery retries)
    probe_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dies", expand_addresses(self.dies, "dies"))
        object.__setattr__(self, "kvcache", parse_sources(self.kvcache, "kvcache"))
        if not self.checkpoint:
            raise FieldError("checkpoint", "must name the checkpoint directory the dies load")
        if not self.dies:
            raise FieldError("dies", "must list at least one npu_emulator address")
        if len(self.dies) > 1 and not self.fabric:
            raise FieldError("fabric", "needed when the instance has more than one die")
        if self.model_cache and not self.kvcache:
            raise FieldError("model_cache", "needs the kvcache shards (kvcache) that hold the model's weights")
        if self.precision not in PRECISIONS:
            raise FieldError("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("block_size", "replication", "max_running", "chunk_tokens", "max_step_tokens"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_waiting", "kv_blocks_per_die"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("rpc_timeout_s", "probe_interval_s", "probe_timeout_s", "pool_refresh_s", "pool_leave_after_s"):
            if not getattr(self, name) > 0:
                raise FieldError(name, f"must be > 0, got {getattr(self, name)}")
        if self.speculative_tokens not in (None, 0, 1):
            raise FieldError("speculative_tokens", f"must be 0 or 1 (the paper's one MTP draft token), "
                             f"got {self.speculative_tokens}")
        if not 0 <= self.batch_wait_s <= 1:
            raise FieldError("batch_wait_s", f"must be in [0, 1] seconds, got {self.batch_wait_s}")

    @property
    def speculative(self) -> int:
        """speculative_tokens resolved: an unset one follows the checkpoint's MTP module."""
        if self.speculative_tokens is not None:
            return self.speculative_tokens
        return min(1, load_config(self.checkpoint).num_nextn_predict_layers)

    def scheduler_limits(self) -> SchedulerLimits:
        return SchedulerLimits(max_running=self.max_running, max_waiting=self.max_waiting,
                               max_step_tokens=self.max_step_tokens, speculative_tokens=self.speculative)

    def loop_settings(self, instance_id: str, microbatches: int = 1) -> LoopSettings:
        return LoopSettings(name=instance_id, microbatches=microbatches, probe_interval_s=self.probe_interval_s,
                            probe_timeout_s=self.probe_timeout_s, batch_wait_s=self.batch_wait_s)
