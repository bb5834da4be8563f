"""Tensor <-> cmx.common.v1.Tensor: dtype enum + shape + raw little-endian row-major bytes.

Decoding validates the message against itself (known dtype, dims >= 0, byte length matching
shape and dtype, an optional size limit) and raises TensorDecodeError naming the field; servicers
map that to INVALID_ARGUMENT. Decoded tensors own their memory and are writable.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cloudmatrix.errors import FieldError
from cmx.common.v1 import common_pb2

__all__ = [
    "TensorDecodeError",
    "encode_tensor",
    "decode_tensor",
    "decode_array",
    "encode_tensors",
    "decode_tensors",
]


class TensorDecodeError(FieldError):
    """A wire tensor is malformed: ``field`` is the tensor's name, the message what is wrong."""


@dataclass(frozen=True)
class _WireType:
    name: str
    torch_dtype: torch.dtype
    storage: np.dtype  # little-endian numpy dtype of the bytes; bf16 travels as int16 bits


_WIRE_TYPES = {
    common_pb2.DTYPE_FLOAT32: _WireType("float32", torch.float32, np.dtype("<f4")),
    common_pb2.DTYPE_FLOAT16: _WireType("float16", torch.float16, np.dtype("<f2")),
    common_pb2.DTYPE_BFLOAT16: _WireType("bfloat16", torch.bfloat16, np.dtype("<i2")),
    common_pb2.DTYPE_FLOAT64: _WireType("float64", torch.float64, np.dtype("<f8")),
    common_pb2.DTYPE_INT8: _WireType("int8", torch.int8, np.dtype("i1")),
    common_pb2.DTYPE_UINT8: _WireType("uint8", torch.uint8, np.dtype("u1")),
    common_pb2.DTYPE_INT32: _WireType("int32", torch.int32, np.dtype("<i4")),
    common_pb2.DTYPE_INT64: _WireType("int64", torch.int64, np.dtype("<i8")),
    common_pb2.DTYPE_BOOL: _WireType("bool", torch.bool, np.dtype("?")),
}
_ENUM_BY_TORCH = {w.torch_dtype: enum for enum, w in _WIRE_TYPES.items()}
_SUPPORTED = ", ".join(w.name for w in _WIRE_TYPES.values())


def encode_tensor(value: torch.Tensor | np.ndarray) -> common_pb2.Tensor:
    """Encode a CPU or device tensor, or a numpy array, of any layout (copied to C order)."""
    t = torch.from_numpy(_native(value)) if isinstance(value, np.ndarray) else value
    enum = _ENUM_BY_TORCH.get(t.dtype)
    if enum is None:
        raise ValueError(f"cannot encode dtype {t.dtype}; supported: {_SUPPORTED}")
    wire = _WIRE_TYPES[enum]
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    data = bits.numpy().astype(wire.storage, copy=False).tobytes()
    return common_pb2.Tensor(dtype=enum, shape=list(t.shape), data=data)


def decode_tensor(
    msg: common_pb2.Tensor, name: str = "tensor", max_bytes: int | None = None
) -> torch.Tensor:
    """Validate and decode into a new, writable CPU tensor. `name` labels errors."""
    wire = _check(msg, name, max_bytes)
    flat = np.frombuffer(msg.data, dtype=wire.storage).astype(wire.storage.newbyteorder("="))
    t = torch.from_numpy(flat)
    if wire.torch_dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(tuple(msg.shape))


def decode_array(
    msg: common_pb2.Tensor, name: str = "tensor", max_bytes: int | None = None
) -> np.ndarray:
    """Like decode_tensor, as a numpy array. bfloat16 has no numpy dtype and is rejected."""
    if msg.dtype == common_pb2.DTYPE_BFLOAT16:
        raise TensorDecodeError(name, "bfloat16 has no numpy dtype; use decode_tensor")
    return decode_tensor(msg, name, max_bytes).numpy()


def encode_tensors(
    values: Mapping[str, torch.Tensor | np.ndarray],
) -> dict[str, common_pb2.Tensor]:
    """Encode a name -> tensor mapping (e.g. for a proto map<string, Tensor> field)."""
    return {key: encode_tensor(v) for key, v in values.items()}


def decode_tensors(
    msgs: Mapping[str, common_pb2.Tensor], max_bytes: int | None = None, field: str | None = None
) -> dict[str, torch.Tensor]:
    """Decode a name -> Tensor mapping; errors name the offending key (as ``field['key']`` when
    the mapping is the request field ``field``). max_bytes is per tensor."""
    return {
        key: decode_tensor(m, f"{field}[{key!r}]" if field else key, max_bytes)
        for key, m in sorted(msgs.items())
    }


def validate_tensor(msg: common_pb2.Tensor, name: str = "tensor", max_bytes: int | None = None) -> None:
    """The checks decode_tensor makes (dtype known, dims >= 0, byte length agrees), without
    copying the data: for stores that keep the bytes as they are."""
    _check(msg, name, max_bytes)


def _native(a: np.ndarray) -> np.ndarray:
    """C-contiguous, native byte order: what torch.from_numpy accepts."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))


def _check(msg: common_pb2.Tensor, name: str, max_bytes: int | None) -> _WireType:
    wire = _wire_type(msg, name)
    shape = list(msg.shape)
    for i, dim in enumerate(shape):
        if dim < 0:
            raise TensorDecodeError(name, f"shape {shape} has negative dim {dim} at index {i}"
            )
    need = math.prod(shape) * wire.storage.itemsize
    if max_bytes is not None and need > max_bytes:
        raise TensorDecodeError(name, f"shape {shape} with dtype {wire.name} needs {need} bytes,"
            f" over the limit of {max_bytes}"
        )
    if len(msg.data) != need:
        raise TensorDecodeError(name, f"shape {shape} with dtype {wire.name} needs {need} bytes,"
            f" got {len(msg.data)}"
        )
    if wire.torch_dtype == torch.bool and msg.data.translate(None, b"\x00\x01"):
        raise TensorDecodeError(name, "bool data must hold only bytes 0 and 1")
    return wire


def _wire_type(msg: common_pb2.Tensor, name: str) -> _WireType:
    wire = _WIRE_TYPES.get(msg.dtype)
    if wire is not None:
        return wire
    known = msg.dtype in common_pb2.DType.values()
    label = common_pb2.DType.Name(msg.dtype) if known else f"enum value {msg.dtype}"
    raise TensorDecodeError(name, f"dtype {label} is not one of {_SUPPORTED}")
