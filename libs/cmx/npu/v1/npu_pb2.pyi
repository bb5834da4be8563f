from cmx.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetDieInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDieInfoReply(_message.Message):
    __slots__ = ("die_id", "num_dies", "hbm_capacity_bytes", "hbm_used_bytes", "kv_blocks_total", "kv_blocks_free", "kv_block_size", "kv_block_bytes", "model_id", "precision", "num_local_experts")
    DIE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_DIES_FIELD_NUMBER: _ClassVar[int]
    HBM_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HBM_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    NUM_LOCAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    die_id: int
    num_dies: int
    hbm_capacity_bytes: int
    hbm_used_bytes: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_block_size: int
    kv_block_bytes: int
    model_id: str
    precision: _common_pb2.Precision
    num_local_experts: int
    def __init__(self, die_id: _Optional[int] = ..., num_dies: _Optional[int] = ..., hbm_capacity_bytes: _Optional[int] = ..., hbm_used_bytes: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_block_bytes: _Optional[int] = ..., model_id: _Optional[str] = ..., precision: _Optional[_Union[_common_pb2.Precision, str]] = ..., num_local_experts: _Optional[int] = ...) -> None: ...

class ExpertPlacement(_message.Message):
    __slots__ = ("layer", "expert", "dies")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    DIES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    dies: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., dies: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelCacheSource(_message.Message):
    __slots__ = ("kvcache_addresses", "blob_prefix")
    KVCACHE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    BLOB_PREFIX_FIELD_NUMBER: _ClassVar[int]
    kvcache_addresses: _containers.RepeatedScalarFieldContainer[str]
    blob_prefix: str
    def __init__(self, kvcache_addresses: _Optional[_Iterable[str]] = ..., blob_prefix: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("checkpoint_path", "model_id", "precision", "die_id", "num_dies", "placement", "model_cache", "kv_block_size", "kv_pool_bytes", "fabric_address", "dispatch_dtype", "fabric_group", "speculative_tokens")
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DIE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_DIES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_CACHE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FABRIC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_DTYPE_FIELD_NUMBER: _ClassVar[int]
    FABRIC_GROUP_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    checkpoint_path: str
    model_id: str
    precision: _common_pb2.Precision
    die_id: int
    num_dies: int
    placement: _containers.RepeatedCompositeFieldContainer[ExpertPlacement]
    model_cache: ModelCacheSource
    kv_block_size: int
    kv_pool_bytes: int
    fabric_address: str
    dispatch_dtype: str
    fabric_group: str
    speculative_tokens: int
    def __init__(self, checkpoint_path: _Optional[str] = ..., model_id: _Optional[str] = ..., precision: _Optional[_Union[_common_pb2.Precision, str]] = ..., die_id: _Optional[int] = ..., num_dies: _Optional[int] = ..., placement: _Optional[_Iterable[_Union[ExpertPlacement, _Mapping]]] = ..., model_cache: _Optional[_Union[ModelCacheSource, _Mapping]] = ..., kv_block_size: _Optional[int] = ..., kv_pool_bytes: _Optional[int] = ..., fabric_address: _Optional[str] = ..., dispatch_dtype: _Optional[str] = ..., fabric_group: _Optional[str] = ..., speculative_tokens: _Optional[int] = ...) -> None: ...

class LoadModelReply(_message.Message):
    __slots__ = ("model_id", "weight_bytes", "kv_blocks_total", "num_local_experts", "from_model_cache", "timing")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_LOCAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    FROM_MODEL_CACHE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    weight_bytes: int
    kv_blocks_total: int
    num_local_experts: int
    from_model_cache: bool
    timing: _common_pb2.Timing
    def __init__(self, model_id: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., num_local_experts: _Optional[int] = ..., from_model_cache: _Optional[bool] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class AllocateBlocksRequest(_message.Message):
    __slots__ = ("num_blocks",)
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    def __init__(self, num_blocks: _Optional[int] = ...) -> None: ...

class AllocateBlocksReply(_message.Message):
    __slots__ = ("block_ids", "kv_blocks_free")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    kv_blocks_free: int
    def __init__(self, block_ids: _Optional[_Iterable[int]] = ..., kv_blocks_free: _Optional[int] = ...) -> None: ...

class KvBlockData(_message.Message):
    __slots__ = ("block_id", "num_tokens", "kv")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    block_id: int
    num_tokens: int
    kv: _common_pb2.Tensor
    def __init__(self, block_id: _Optional[int] = ..., num_tokens: _Optional[int] = ..., kv: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class WriteBlocksRequest(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[KvBlockData]
    def __init__(self, blocks: _Optional[_Iterable[_Union[KvBlockData, _Mapping]]] = ...) -> None: ...

class WriteBlocksReply(_message.Message):
    __slots__ = ("bytes_written", "timing")
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    bytes_written: int
    timing: _common_pb2.Timing
    def __init__(self, bytes_written: _Optional[int] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class ReadBlocksRequest(_message.Message):
    __slots__ = ("block_ids", "num_tokens")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ReadBlocksReply(_message.Message):
    __slots__ = ("blocks", "timing")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[KvBlockData]
    timing: _common_pb2.Timing
    def __init__(self, blocks: _Optional[_Iterable[_Union[KvBlockData, _Mapping]]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class FreeBlocksRequest(_message.Message):
    __slots__ = ("block_ids",)
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FreeBlocksReply(_message.Message):
    __slots__ = ("kv_blocks_free",)
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    kv_blocks_free: int
    def __init__(self, kv_blocks_free: _Optional[int] = ...) -> None: ...

class SequenceInput(_message.Message):
    __slots__ = ("seq_id", "token_ids", "start_position", "block_table", "sampling", "skip_sampling", "cached", "following_token", "draft_token")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SKIP_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    start_position: int
    block_table: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    skip_sampling: bool
    cached: bool
    following_token: int
    draft_token: int
    def __init__(self, seq_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., start_position: _Optional[int] = ..., block_table: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., skip_sampling: _Optional[bool] = ..., cached: _Optional[bool] = ..., following_token: _Optional[int] = ..., draft_token: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("step", "microbatch", "sequences", "return_logits", "finished_seq_ids")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    microbatch: int
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceInput]
    return_logits: bool
    finished_seq_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., microbatch: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[SequenceInput, _Mapping]]] = ..., return_logits: _Optional[bool] = ..., finished_seq_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SequenceOutput(_message.Message):
    __slots__ = ("seq_id", "token_id", "has_token", "logprob", "logits", "sampled_logprobs", "prompt_logprobs", "bonus_token", "bonus_logprobs", "draft_token")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    BONUS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BONUS_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_id: int
    has_token: bool
    logprob: float
    logits: _common_pb2.Tensor
    sampled_logprobs: _common_pb2.TokenLogprobs
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    bonus_token: int
    bonus_logprobs: _common_pb2.TokenLogprobs
    draft_token: int
    def __init__(self, seq_id: _Optional[str] = ..., token_id: _Optional[int] = ..., has_token: _Optional[bool] = ..., logprob: _Optional[float] = ..., logits: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., sampled_logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., bonus_token: _Optional[int] = ..., bonus_logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ..., draft_token: _Optional[int] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("outputs", "timing")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[SequenceOutput]
    timing: _common_pb2.Timing
    def __init__(self, outputs: _Optional[_Iterable[_Union[SequenceOutput, _Mapping]]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class RunKernelRequest(_message.Message):
    __slots__ = ("kernel", "inputs", "params")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    kernel: str
    inputs: _containers.MessageMap[str, _common_pb2.Tensor]
    params: _containers.ScalarMap[str, str]
    def __init__(self, kernel: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _common_pb2.Tensor]] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RunKernelReply(_message.Message):
    __slots__ = ("outputs", "timing")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, _common_pb2.Tensor]
    timing: _common_pb2.Timing
    def __init__(self, outputs: _Optional[_Mapping[str, _common_pb2.Tensor]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class GetExpertLoadRequest(_message.Message):
    __slots__ = ("reset",)
    RESET_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    def __init__(self, reset: _Optional[bool] = ...) -> None: ...

class GetExpertLoadReply(_message.Message):
    __slots__ = ("token_counts", "since_step", "until_step", "layers")
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    SINCE_STEP_FIELD_NUMBER: _ClassVar[int]
    UNTIL_STEP_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    token_counts: _common_pb2.Tensor
    since_step: int
    until_step: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_counts: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., since_step: _Optional[int] = ..., until_step: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ...) -> None: ...
