"""Proto <-> dataclass conversions for the npu_emulator servicer."""
from __future__ import annotations

from cloudmatrix.errors import FieldError
from cloudmatrix.rpc.sampling import logprobs_to_proto, sampling_from_proto
from cloudmatrix.rpc.tensor_codec import encode_tensor
from cmx.common.v1 import common_pb2
from cmx.npu.v1 import npu_pb2
from services.npu_emulator.engine import SequenceResult
from services.npu_emulator.loader import LoadSpec
from services.npu_emulator.sequences import SequenceStep

PRECISION_NAMES = {
    common_pb2.PRECISION_FP32: "fp32", common_pb2.PRECISION_INT8: "int8",
    common_pb2.PRECISION_PASA: "pasa", common_pb2.PRECISION_INT8_PASA: "int8-pasa",
}
PRECISION_ENUMS = {name: enum for enum, name in PRECISION_NAMES.items()}


def sequence_step(s) -> SequenceStep:
    return SequenceStep(s.seq_id, list(s.token_ids), s.start_position, list(s.block_table),
                        sampling_from_proto(s.sampling), s.skip_sampling, s.cached,
                        s.following_token if s.HasField("following_token") else None,
                        s.draft_token if s.HasField("draft_token") else None)


def sequence_output(r: SequenceResult) -> npu_pb2.SequenceOutput:
    logprobs = [logprobs_to_proto(t) for t in r.sampled_logprobs]
    out = npu_pb2.SequenceOutput(
        seq_id=r.seq_id, token_id=r.tokens[0] if r.tokens else 0, has_token=bool(r.tokens),
        logits=encode_tensor(r.logits) if r.logits is not None else None,
        sampled_logprobs=logprobs[0] if logprobs else None,
        prompt_logprobs=[logprobs_to_proto(t) for t in r.prompt_logprobs], draft_token=r.draft)
    if len(r.tokens) > 1:
        out.bonus_token = r.tokens[1]
        if len(logprobs) > 1:
            out.bonus_logprobs.CopyFrom(logprobs[1])
    return out


def load_spec(request, config) -> LoadSpec:
    if not request.checkpoint_path:
        raise FieldError("checkpoint_path", "must name a checkpoint directory")
    if request.precision not in PRECISION_NAMES:
        raise FieldError("precision", f"{common_pb2.Precision.Name(request.precision)} is not a serving precision")
    placement = {(p.layer, p.expert): tuple(p.dies) for p in request.placement}
    return LoadSpec(
        checkpoint=request.checkpoint_path, precision=PRECISION_NAMES[request.precision],
        die_id=request.die_id, num_dies=request.num_dies or 1, placement=placement,
        block_size=request.kv_block_size or config.kv_block_size,
        pool_bytes=request.kv_pool_bytes or config.kv_pool_bytes,
        fabric_address=request.fabric_address, fabric_group=request.fabric_group,
        dispatch_dtype=request.dispatch_dtype,
        cache_shards=tuple(request.model_cache.kvcache_addresses) if request.HasField("model_cache") else (),
        cache_prefix=request.model_cache.blob_prefix if request.HasField("model_cache") else "",
        speculative_tokens=request.speculative_tokens,
    )
