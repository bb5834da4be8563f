"""SamplingParams <-> cmx.common.v1.SamplingParams: the one converter every service uses."""
from __future__ import annotations

from cloudmatrix.model.sampling import SamplingParams
from cmx.common.v1 import common_pb2


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """The proto's sampling fields (unset top_p = 1, unset max_tokens = 1) as SamplingParams."""
    return SamplingParams(temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
                          seed=p.seed if p.HasField("seed") else None, max_tokens=max(p.max_tokens, 1))


def sampling_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    proto = common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_tokens=p.max_tokens)
    if p.seed is not None:
        proto.seed = p.seed
    return proto
