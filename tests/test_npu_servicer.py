"""The npu_emulator process over gRPC: RunKernel, DieInfo, and malformed input handling."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from cloudmatrix.kernels.fp16 import cube_matmul_reference
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.rpc.tensor_codec import decode_tensor, encode_tensor
from cmx.common.v1 import common_pb2
from cmx.npu.v1 import npu_pb2, npu_pb2_grpc
from tests.services import running_service


@pytest.fixture(scope="module")
def die(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("npu")
    with running_service("npu_emulator", run_dir, "die_id=1", "num_dies=4") as record:
        with grpc.insecure_channel(record.address) as channel:
            yield record, npu_pb2_grpc.NpuEmulatorStub(channel)


def _gemm(stub, a, b, precision="fp16"):
    request = npu_pb2.RunKernelRequest(kernel="gemm", params={"precision": precision})
    request.inputs["a"].CopyFrom(encode_tensor(a))
    request.inputs["b"].CopyFrom(encode_tensor(b))
    return stub.RunKernel(request, timeout=30)


def test_die_info(die):
    _, stub = die
    info = stub.GetDieInfo(npu_pb2.GetDieInfoRequest(), timeout=5)
    assert (info.die_id, info.num_dies, info.hbm_capacity_bytes) == (1, 4, 64 * 10**9)


def test_gemm_on_the_die_matches_references(die):
    _, stub = die
    gen = torch.Generator().manual_seed(21)
    a, b = torch.randn(24, 40, generator=gen), torch.randn(40, 16, generator=gen)
    reply = _gemm(stub, a, b)
    out = decode_tensor(reply.outputs["out"])
    assert out.dtype == torch.float16
    ref = cube_matmul_reference(a, b)
    assert ((out.float() - ref).abs() <= 1e-3 * ref.abs().clamp_min(1e-2)).all()
    exact = decode_tensor(_gemm(stub, a, b, precision="fp32").outputs["out"])
    torch.testing.assert_close(exact, (a.double() @ b.double()).float(), rtol=1e-5, atol=1e-5)
    assert reply.timing.measured_s > 0 and reply.timing.modeled_s > 0


def test_malformed_tensor_is_invalid_argument_and_server_keeps_serving(die):
    record, stub = die
    good = encode_tensor(torch.randn(4, 8))
    bad = common_pb2.Tensor(dtype=good.dtype, shape=[4, 8], data=good.data[:-4])  # 124 bytes for 128
    request = npu_pb2.RunKernelRequest(kernel="gemm", inputs={"a": bad, "b": encode_tensor(torch.randn(8, 2))})
    with pytest.raises(grpc.RpcError) as err:
        stub.RunKernel(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'a'" in err.value.details() and "128" in err.value.details()
    assert health_check_sync(record.address) == "SERVING"
    reply = _gemm(stub, torch.randn(2, 3), torch.randn(3, 2))
    assert decode_tensor(reply.outputs["out"]).shape == (2, 2)


@pytest.mark.parametrize("kernel,inputs,params,needle", [
    ("gemm", {"a": np.ones((2, 3), np.float32), "b": np.ones((4, 2), np.float32)}, {}, "must be [M, K]"),
    ("gemm", {"a": np.ones((2, 3), np.float32)}, {}, "missing inputs ['b']"),
    ("gemm", {"a": np.ones((2, 3), np.float32), "b": np.ones((3, 2), np.float32)}, {"precision": "fp8"}, "precision"),
    ("warp_drive", {}, {}, "unknown kernel 'warp_drive'"),
])
def test_bad_kernel_requests_name_the_problem(die, kernel, inputs, params, needle):
    _, stub = die
    request = npu_pb2.RunKernelRequest(kernel=kernel, params=params)
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(encode_tensor(value))
    with pytest.raises(grpc.RpcError) as err:
        stub.RunKernel(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
