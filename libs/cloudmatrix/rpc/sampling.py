"""The request vocabulary <-> cmx.common.v1 protos: the one converter of SamplingParams and
FinishReason every service and client uses."""
from __future__ import annotations

from cloudmatrix.sampling_params import DEFAULT_MAX_TOKENS, FinishReason, SamplingParams, TokenLogprobs
from cmx.common.v1 import common_pb2

_FINISH_PROTO = {FinishReason.STOP: common_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
                 FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
                 FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR}
_FINISH_OF_PROTO = {v: k for k, v in _FINISH_PROTO.items()}


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """The proto's fields as SamplingParams: proto3's unset values mean the defaults (top_p 0 = 1,
    max_tokens 0 = DEFAULT_MAX_TOKENS); FieldError names a field out of range."""
    return SamplingParams(temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
                          seed=p.seed if p.HasField("seed") else None, max_tokens=p.max_tokens or DEFAULT_MAX_TOKENS,
                          stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos,
                          logprobs=p.logprobs if p.HasField("logprobs") else None,
                          prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None)


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
                                     max_tokens=p.max_tokens, stop=list(p.stop),
                                     stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
                                     logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs)


def finish_to_proto(reason: FinishReason | None) -> int:
    """FINISH_REASON_UNSPECIFIED while the request runs (None)."""
    return common_pb2.FINISH_REASON_UNSPECIFIED if reason is None else _FINISH_PROTO[FinishReason(reason)]


def finish_from_proto(value: int) -> FinishReason | None:
    return _FINISH_OF_PROTO.get(value)


def logprobs_to_proto(t: TokenLogprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(token_id=t.token_id, logprob=t.logprob, top_token_ids=[i for i, _ in t.top],
                                 top_logprobs=[lp for _, lp in t.top])


def logprobs_from_proto(p: common_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(p.token_id, p.logprob, tuple(zip(p.top_token_ids, p.top_logprobs)))

