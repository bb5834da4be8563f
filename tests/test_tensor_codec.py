"""Round trips of every wire dtype, and rejection of every malformed wire tensor."""

import numpy as np
import pytest
import torch

from cloudmatrix.rpc.tensor_codec import (
    TensorDecodeError,
    decode_array,
    decode_tensor,
    decode_tensors,
    encode_tensor,
    encode_tensors,
)
from cmx.common.v1 import common_pb2

DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool,
]
SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (0,), (4, 0, 2)]


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip(dtype, shape):
    gen = torch.Generator().manual_seed(100 * DTYPES.index(dtype) + SHAPES.index(shape))
    x = _random(shape, dtype, gen)
    msg = common_pb2.Tensor.FromString(encode_tensor(x).SerializeToString())
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == x.numel() * x.element_size()
    _assert_same(decode_tensor(msg), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_data_is_not_trivial(dtype):
    x = _random((64,), dtype, torch.Generator().manual_seed(1))
    assert len(torch.unique(x)) > 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    gen = torch.Generator().manual_seed(2)
    base = _random((6, 8), dtype, gen)
    for view in (base.t(), base[:, ::3], base[1:5:2, 2:], base.expand(2, 6, 8)):
        assert not view.is_contiguous()
        _assert_same(decode_tensor(encode_tensor(view)), view)


def test_wire_bytes_are_little_endian_row_major():
    msg = encode_tensor(torch.tensor([[1, 2], [3, 258]], dtype=torch.int32).t())
    assert msg.dtype == common_pb2.DTYPE_INT32 and list(msg.shape) == [2, 2]
    assert msg.data == bytes([1, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 2, 1, 0, 0])
    bf16 = encode_tensor(torch.tensor([1.0], dtype=torch.bfloat16))
    assert bf16.data == bytes([0x80, 0x3F])  # upper half of float32 1.0 (0x3F800000)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.bfloat16], ids=str)
def test_numpy_round_trip(dtype):
    x = _random((3, 4), dtype, torch.Generator().manual_seed(3)).numpy()
    for arr in (x, x[:, ::2], x.T, x[::-1, ::-2], x.astype(x.dtype.newbyteorder(">"))):
        got = decode_array(encode_tensor(arr))
        assert got.dtype == x.dtype.newbyteorder("=") and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)


def test_decoded_tensor_is_writable_and_owns_memory():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(4))
    msg = encode_tensor(x)
    wire = bytes(msg.data)
    y = decode_tensor(msg)
    y += 1
    z = decode_array(msg)
    z[0, 0] = 123.0
    assert msg.data == wire
    _assert_same(decode_tensor(msg), x)


def test_tensor_maps_round_trip():
    gen = torch.Generator().manual_seed(5)
    values = {
        "q": torch.randn(2, 3, generator=gen),
        "ids": torch.randint(0, 9, (5,), generator=gen),
    }
    got = decode_tensors(encode_tensors(values))
    assert got.keys() == values.keys()
    for key in values:
        _assert_same(got[key], values[key])


def test_encode_rejects_unsupported_dtype():
    with pytest.raises(ValueError, match="complex64"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))


def _f32(shape, nbytes):
    return common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=shape, data=b"\x01" * nbytes)


MALFORMED = {
    "unspecified dtype": (
        common_pb2.Tensor(shape=[2], data=bytes(8)), "a: dtype DTYPE_UNSPECIFIED"
    ),
    "unknown dtype": (
        common_pb2.Tensor(dtype=99, shape=[2], data=bytes(8)), "a: dtype enum value 99"
    ),
    "negative dim": (_f32([2, -3], 0), r"a: shape \[2, -3\] has negative dim -3"),
    "short data": (
        _f32([2, 3], 20), r"a: shape \[2, 3\] with dtype float32 needs 24 bytes, got 20"
    ),
    "long data": (_f32([2, 3], 28), "needs 24 bytes, got 28"),
    "data for an empty tensor": (_f32([0, 3], 4), "needs 0 bytes, got 4"),
    "scalar with no data": (_f32([], 0), r"shape \[\] with dtype float32 needs 4 bytes, got 0"),
    "bool byte not 0 or 1": (
        common_pb2.Tensor(dtype=common_pb2.DTYPE_BOOL, shape=[3], data=b"\x00\x02\x01"),
        "a: bool data must hold only bytes 0 and 1",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_decode_rejects_malformed(case):
    msg, message = MALFORMED[case]
    with pytest.raises(TensorDecodeError, match=message):
        decode_tensor(msg, "a")
    with pytest.raises(ValueError):
        decode_tensor(msg, "a")


def test_decode_rejects_over_max_bytes():
    msg = encode_tensor(torch.randn(4, 8, generator=torch.Generator().manual_seed(6)))
    message = "kv: .* needs 128 bytes, over the limit of 100"
    with pytest.raises(TensorDecodeError, match=message):
        decode_tensor(msg, "kv", max_bytes=100)
    assert decode_tensor(msg, "kv", max_bytes=128).shape == (4, 8)


def test_max_bytes_checked_before_data_length():
    huge = common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[2**40, 2**20], data=b"")
    with pytest.raises(TensorDecodeError, match="over the limit of 1024"):
        decode_tensor(huge, "x", max_bytes=1024)


def test_decode_tensors_names_the_key():
    msgs = {"good": encode_tensor(torch.ones(2)), "bad": _f32([3], 8)}
    with pytest.raises(TensorDecodeError, match="bad: shape"):
        decode_tensors(msgs)


def test_decode_array_rejects_bfloat16():
    msg = encode_tensor(torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(TensorDecodeError, match="w: bfloat16 has no numpy dtype"):
        decode_array(msg, "w")
