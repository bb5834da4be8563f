"""Malformed input, property-based (hypothesis), against real processes: random bytes as the request
of every RPC of every service (unary, server-, client- and bidi-streaming), random JSON and random
bytes to every HTTP endpoint of the gateway. Properties: no answer is UNKNOWN / INTERNAL (an
uncaught exception) or a 5xx, a refusal says why, every process is still alive and SERVING
afterwards, and none grew by more than 300 MB. CMX_FUZZ_EXAMPLES sets the examples per method
(default 15; `make test-reliability` runs 200); the number of cases tried is printed."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.processes import is_alive, load_state
from cloudmatrix.launcher.topology import parse_topology
from cloudmatrix.rpc.channel import health_check_sync
from cmx.decode.v1 import decode_pb2
from cmx.fabric.v1 import fabric_pb2
from cmx.gateway.v1 import gateway_pb2
from cmx.kvcache.v1 import kvcache_pb2
from cmx.npu.v1 import npu_pb2
from cmx.prefill.v1 import prefill_pb2
from tests.waiting import rss_mb

pytestmark = pytest.mark.timeout(900)
EXAMPLES = int(os.environ.get("CMX_FUZZ_EXAMPLES", "15"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Answers that say "no" clearly; UNKNOWN and INTERNAL mean an exception escaped a handler.
CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
         grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ALREADY_EXISTS,
         grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED}
SERVICES = [  # (process, a service it serves)
    ("kvcache-0", kvcache_pb2.DESCRIPTOR.services_by_name["KvCacheShard"]),
    ("fabric-0", fabric_pb2.DESCRIPTOR.services_by_name["UbFabric"]),
    ("spare-0", npu_pb2.DESCRIPTOR.services_by_name["NpuEmulator"]),
    ("prefill-0", prefill_pb2.DESCRIPTOR.services_by_name["Prefill"]),
    ("decode-0", decode_pb2.DESCRIPTOR.services_by_name["Decode"]),
    ("gateway-0", gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]),
    ("kvcache-0", health_pb2.DESCRIPTOR.services_by_name["Health"]),  # every process serves it
]
METHODS = [(process, service.full_name, m.name, m.client_streaming, m.server_streaming)
           for process, service in SERVICES for m in service.methods]
TRIED = {"grpc": 0, "http": 0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_checkpoint):
    run_dir = tmp_path_factory.mktemp("fuzz-run")
    common = {"checkpoint": str(tiny_checkpoint), "precision": "fp32", "kvcache": "{addresses:kvcache}"}
    topology = parse_topology({"name": "fuzz", "services": [
        {"name": "kvcache", "service": "kvcache"}, {"name": "fabric", "service": "ub_fabric"},
        {"name": "spare", "service": "npu_emulator"}, {"name": "pdie", "service": "npu_emulator"},
        {"name": "ddie", "service": "npu_emulator"},
        {"name": "prefill", "service": "prefill", "set": {**common, "dies": "{addresses:pdie}"}},
        {"name": "decode", "service": "decode", "set": {**common, "dies": "{addresses:ddie}"}},
        {"name": "gateway", "service": "gateway", "set": {
            "checkpoint": str(tiny_checkpoint), "prefill": "{addresses:prefill}", "decode": "{addresses:decode}",
            "request_timeout_s": 20}}]}, Path("."))
    records = bring_up(topology, run_dir, 180.0)
    rss = {r.name: rss_mb(r.pid) for r in records}
    try:
        yield run_dir, {r.name: r for r in records}, rss
    finally:
        bring_down(run_dir, grace_s=5.0)


def _call(channel: grpc.Channel, path: str, client_streaming: bool, server_streaming: bool,
          payloads: list[bytes]) -> grpc.StatusCode:
    """One call with raw request bytes; the status it ended with."""
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    kind = kinds[client_streaming, server_streaming]
    call = kind(path)  # no serializers: the bytes go on the wire as they are
    try:
        request = iter(payloads) if client_streaming else payloads[0]
        answer = call(request, timeout=5.0)
        if server_streaming:
            for _ in answer:
                pass
    except grpc.RpcError as err:
        if err.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            assert err.details(), f"{path}: {err.code().name} without details"
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("process,service,method,client_streaming,server_streaming", METHODS,
                         ids=[f"{s.rsplit('.', 1)[-1]}.{m}" for _, s, m, _, _ in METHODS])
def test_random_bytes_get_a_clear_answer_from_every_rpc(stack, process, service, method, client_streaming,
                                                        server_streaming):
    _, records, _ = stack
    path = f"/{service}/{method}"

    @FUZZ
    @given(st.lists(st.binary(max_size=600), min_size=1, max_size=3))
    def fuzz(payloads: list[bytes]) -> None:
        with grpc.insecure_channel(records[process].address) as channel:
            code = _call(channel, path, client_streaming, server_streaming, payloads)
        TRIED["grpc"] += 1
        assert code in CLEAR, f"{path} answered {code.name} to {payloads!r}"

    fuzz()
    assert TRIED["grpc"] > 0
    _every_process_serves_and_stays_lean(stack)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                    | st.text(max_size=40), lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=12)
FIELDS = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "n", "logprobs", "stream_options", "ignore_eos", "max_completion_tokens", "role", "content")


def _post(port: int, path: str, data: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_random_json_and_bytes_get_a_clear_answer_from_every_http_endpoint(stack, path):
    run_dir, records, _ = stack
    port = json.loads((run_dir / "ready" / "gateway-0.http.json").read_text())["http_port"]
    bodies = st.one_of(
        st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6).map(lambda d: {"model": "tiny", **d}),
        st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6), JSON)

    @FUZZ
    @given(st.one_of(bodies.map(lambda b: json.dumps(b).encode()), st.binary(max_size=300)))
    def fuzz(data: bytes) -> None:
        status, reply = _post(port, path, data)
        TRIED["http"] += 1
        assert status in (200, 400, 404, 413, 429), (status, data, reply)
        if status != 200:
            error = json.loads(reply)["error"]  # OpenAI's error shape, with a message
            assert error["message"] and error["type"]

    fuzz()
    assert TRIED["http"] > 0
    _every_process_serves_and_stays_lean(stack)


def _every_process_serves_and_stays_lean(stack) -> None:
    """After a fuzz round: every process of the stack is alive, SERVING, and has not grown by
    300 MB since the stack started."""
    run_dir, _, rss = stack
    print(f"fuzz cases so far: {TRIED['grpc']} gRPC calls over {len(METHODS)} methods, {TRIED['http']} HTTP requests")
    for record in load_state(run_dir):
        assert is_alive(record), record.name
        assert health_check_sync(record.address, timeout=5.0) == "SERVING", record.name
        assert rss_mb(record.pid) - rss[record.name] < 300, record.name
