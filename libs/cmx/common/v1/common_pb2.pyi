from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class RoundKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_KIND_UNSPECIFIED: _ClassVar[RoundKind]
    ROUND_KIND_DISPATCH: _ClassVar[RoundKind]
    ROUND_KIND_COMBINE: _ClassVar[RoundKind]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_INT8: _ClassVar[Precision]
    PRECISION_INT8_PASA: _ClassVar[Precision]
    PRECISION_PASA: _ClassVar[Precision]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]

class BlockKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLOCK_KIND_UNSPECIFIED: _ClassVar[BlockKind]
    BLOCK_KIND_FULL: _ClassVar[BlockKind]
    BLOCK_KIND_TAIL: _ClassVar[BlockKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_BOOL: DType
ROUND_KIND_UNSPECIFIED: RoundKind
ROUND_KIND_DISPATCH: RoundKind
ROUND_KIND_COMBINE: RoundKind
PRECISION_UNSPECIFIED: Precision
PRECISION_FP32: Precision
PRECISION_INT8: Precision
PRECISION_INT8_PASA: Precision
PRECISION_PASA: Precision
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_ERROR: FinishReason
BLOCK_KIND_UNSPECIFIED: BlockKind
BLOCK_KIND_FULL: BlockKind
BLOCK_KIND_TAIL: BlockKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PhaseTiming(_message.Message):
    __slots__ = ("phase", "measured_s", "modeled_s")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MEASURED_S_FIELD_NUMBER: _ClassVar[int]
    MODELED_S_FIELD_NUMBER: _ClassVar[int]
    phase: str
    measured_s: float
    modeled_s: float
    def __init__(self, phase: _Optional[str] = ..., measured_s: _Optional[float] = ..., modeled_s: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("measured_s", "modeled_s", "phases")
    MEASURED_S_FIELD_NUMBER: _ClassVar[int]
    MODELED_S_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    measured_s: float
    modeled_s: float
    phases: _containers.RepeatedCompositeFieldContainer[PhaseTiming]
    def __init__(self, measured_s: _Optional[float] = ..., modeled_s: _Optional[float] = ..., phases: _Optional[_Iterable[_Union[PhaseTiming, _Mapping]]] = ...) -> None: ...

class RoundId(_message.Message):
    __slots__ = ("step", "layer", "microbatch", "kind")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    step: int
    layer: int
    microbatch: int
    kind: RoundKind
    def __init__(self, step: _Optional[int] = ..., layer: _Optional[int] = ..., microbatch: _Optional[int] = ..., kind: _Optional[_Union[RoundKind, str]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "stop_token_ids", "ignore_eos", "logprobs", "prompt_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    prompt_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("token_id", "logprob", "top_token_ids", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class BlockKey(_message.Message):
    __slots__ = ("digest", "namespace")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    namespace: str
    def __init__(self, digest: _Optional[bytes] = ..., namespace: _Optional[str] = ...) -> None: ...

class KvHandle(_message.Message):
    __slots__ = ("namespace", "block_keys", "num_tokens", "block_size", "lease_ids", "draft_token")
    class LeaseIdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_KEYS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    block_keys: _containers.RepeatedScalarFieldContainer[bytes]
    num_tokens: int
    block_size: int
    lease_ids: _containers.ScalarMap[str, str]
    draft_token: int
    def __init__(self, namespace: _Optional[str] = ..., block_keys: _Optional[_Iterable[bytes]] = ..., num_tokens: _Optional[int] = ..., block_size: _Optional[int] = ..., lease_ids: _Optional[_Mapping[str, str]] = ..., draft_token: _Optional[int] = ...) -> None: ...

class InstanceLoad(_message.Message):
    __slots__ = ("instance_id", "running_requests", "waiting_requests", "waiting_tokens", "kv_blocks_used", "kv_blocks_total", "recent_step_measured_s", "recent_step_modeled_s", "die_kv_blocks_free", "preemptions")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RECENT_STEP_MEASURED_S_FIELD_NUMBER: _ClassVar[int]
    RECENT_STEP_MODELED_S_FIELD_NUMBER: _ClassVar[int]
    DIE_KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    running_requests: int
    waiting_requests: int
    waiting_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    recent_step_measured_s: float
    recent_step_modeled_s: float
    die_kv_blocks_free: _containers.RepeatedScalarFieldContainer[int]
    preemptions: int
    def __init__(self, instance_id: _Optional[str] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., waiting_tokens: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., recent_step_measured_s: _Optional[float] = ..., recent_step_modeled_s: _Optional[float] = ..., die_kv_blocks_free: _Optional[_Iterable[int]] = ..., preemptions: _Optional[int] = ...) -> None: ...
