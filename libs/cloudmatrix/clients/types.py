"""The dataclasses the clients take and return instead of protos."""
from __future__ import annotations

import dataclasses
from typing import Any

from cloudmatrix.sampling_params import FinishReason, SamplingParams, TokenLogprobs
from cmx.common.v1 import common_pb2

# The clients take the request vocabulary's SamplingParams (one definition, one validation);
# ``Sampling`` is its name in the clients' API.
Sampling = SamplingParams
PRECISION_NAMES = {common_pb2.PRECISION_FP32: "fp32", common_pb2.PRECISION_INT8: "int8",
                   common_pb2.PRECISION_PASA: "pasa", common_pb2.PRECISION_INT8_PASA: "int8-pasa"}
PRECISIONS = {name: value for value, name in PRECISION_NAMES.items()}


@dataclasses.dataclass(frozen=True)
class Timing:
    """Measured wall seconds here and modeled CloudMatrix384 seconds, total and per phase."""

    measured_s: float
    modeled_s: float
    measured: dict[str, float]
    modeled: dict[str, float]

    @classmethod
    def from_proto(cls, t: common_pb2.Timing) -> Timing:
        return cls(t.measured_s, t.modeled_s, {p.phase: p.measured_s for p in t.phases},
                   {p.phase: p.modeled_s for p in t.phases})


@dataclasses.dataclass(frozen=True)
class InstanceLoad:
    """What a prefill or decode instance is doing (the gateway's load balancing input)."""

    instance_id: str
    running: int
    waiting: int
    waiting_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions: int

    @property
    def requests(self) -> int:
        return self.running + self.waiting

    @classmethod
    def from_proto(cls, load: common_pb2.InstanceLoad) -> InstanceLoad:
        return cls(load.instance_id, load.running_requests, load.waiting_requests, load.waiting_tokens,
                   load.kv_blocks_used, load.kv_blocks_total, load.preemptions)


@dataclasses.dataclass(frozen=True)
class ModelCard:
    id: str
    precision: str
    max_context_tokens: int


@dataclasses.dataclass(frozen=True)
class GenerateChunk:
    """A piece of a completion; the last one has ``finish_reason`` and ``usage``."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    usage: dict[str, int] | None
    timing: Timing | None
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)         # one per token_ids
    prompt_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # first chunk, if asked


@dataclasses.dataclass(frozen=True)
class PrefillResult:
    first_token: int
    first_token_logprob: float
    kv: Any                              # the prompt's KV handle in the pool: pass it on to decode (None:
                                         # prefill_stream's first result, the KV not yet there)
    cached_tokens: int
    computed_tokens: int
    timing: Timing
    logprobs: TokenLogprobs | None = None         # of first_token, with sampling.logprobs set
    prompt_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # of the prompt after its first


@dataclasses.dataclass(frozen=True)
class DecodeStep:
    token_ids: list[int]
    finish_reason: FinishReason | None   # None while running
    modeled_s: float
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # one per token, when asked for


@dataclasses.dataclass(frozen=True)
class DieInfo:
    die_id: int
    num_dies: int
    hbm_capacity_bytes: int
    hbm_used_bytes: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_block_size: int
    kv_block_bytes: int
    model_id: str                        # "" until a model is loaded
    precision: str
    num_local_experts: int
