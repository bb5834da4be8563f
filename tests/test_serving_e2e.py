"""The whole serving system from topology files: greedy output through the gateway equals the local
engine (fp32 with two prefill instances, int8-pasa with one and two; fp32 with one is in
test_gateway.py), and one request's trace holds spans from every service type: in the span files,
in `cmx trace` run right after the request, and at an OTLP receiver the topology exports to."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.model.generate import generate
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.sampling_params import SamplingParams
from cloudmatrix.telemetry.trace_view import read_spans, trace_of_request

pytestmark = pytest.mark.timeout(400)
PROMPTS = ["The supernode", "Dispatch sends tokens to the dies", "Once upon a time, a small team",
           "Blocks are addressed by the hash of their tokens"]


def cmx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudmatrix.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def _topology(path, checkpoint, precision: str, prefill_instances: int, **top):
    common = {"checkpoint": str(checkpoint), "precision": precision, "fabric": "{addresses:fabric}",
              "kvcache": "{addresses:kvcache}"}
    services = [{"name": "kvcache", "service": "kvcache", "count": 2}, {"name": "fabric", "service": "ub_fabric"},
                {"name": "ddie", "service": "npu_emulator", "count": 2},
                {"name": "decode", "service": "decode", "set": {**common, "dies": "{addresses:ddie}"}}]
    for i in range(prefill_instances):
        services += [{"name": f"pdie{i}", "service": "npu_emulator"},
                     {"name": f"prefill{i}", "service": "prefill",
                      "set": {**common, "dies": f"{{addresses:pdie{i}}}", "instance_id": f"prefill-{i}"}}]
    prefills = ",".join(f"{{addresses:prefill{i}}}" for i in range(prefill_instances))
    # a long drain: a request in flight at `cmx down` streams to its end (_stream_through_down)
    gateway = {"checkpoint": str(checkpoint), "prefill": prefills, "decode": "{addresses:decode}",
               "server.grace_s": 60}
    if top.get("api_key"):
        gateway["api_keys"] = top.pop("api_key")
    services.append({"name": "gateway", "service": "gateway", "set": gateway})
    path.write_text(yaml.safe_dump({"name": f"e2e-{precision}", "services": services, **top}))
    return path


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on 127.0.0.1: keeps every span with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):
        with self._lock:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        attributes = {a.key: a.value.string_value for a in span.attributes}
                        self.spans.append({"trace_id": span.trace_id.hex(), "name": span.name,
                                           "parent": span.parent_span_id.hex(), "resource": resource,
                                           "attributes": attributes})
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace_of(self, request_id: str) -> list[dict]:
        with self._lock:
            ids = {s["trace_id"] for s in self.spans if s["attributes"].get("request_id") == request_id}
            return [s for s in self.spans if s["trace_id"] in ids]


@pytest.fixture
def otlp_receiver():
    receiver = OtlpReceiver()
    yield receiver
    receiver.server.stop(grace=None)


def _serve_and_complete(tmp_path, checkpoint, precision, prefill_instances, otlp_endpoint=None, after=None,
                        in_flight_at_down=False):
    run_dir = tmp_path / f"run-{precision}"
    topo = _topology(tmp_path / f"{precision}.yaml", checkpoint, precision, prefill_instances)
    up = cmx("up", "--topology", str(topo), "--run-dir", str(run_dir),
             *(("--otlp-endpoint", otlp_endpoint) if otlp_endpoint else ()))
    assert up.returncode == 0, up.stderr
    try:
        port = json.loads(next((run_dir / "ready").glob("gateway*.http.json")).read_text())["http_port"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: the gateway spreads them
            completions = list(pool.map(
                lambda p: client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0), PROMPTS))
        # Alone, so every step it needs runs in its own trace (a shared step joins its oldest request's).
        completions.append(client.completions.create(model=model, prompt="A prompt nobody sent before, about "
                                                     "the fabric and its rounds", max_tokens=4, temperature=0))
        if after is not None:
            after(run_dir, completions[-1].id.split("-", 1)[1])
        if in_flight_at_down:
            _stream_through_down(client, model, run_dir)
    finally:
        if (run_dir / "state.json").exists():
            down = cmx("down", "--run-dir", str(run_dir))  # flushes every process's spans
            assert down.returncode == 0, down.stderr
    return completions, run_dir


def _stream_through_down(client, model: str, run_dir) -> None:
    """`cmx down` while a request streams: the gateway goes first and finishes it (every token),
    and only then the instances, dies and pool stop; nothing is killed hard. (Stopped all at once,
    the dies refuse the decode's next step and the stream fails.)"""
    stream = client.completions.create(model=model, prompt="A request in flight when the run stops",
                                       max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks, down = [next(iter(stream))], None
    with ThreadPoolExecutor(1) as pool:
        down = pool.submit(cmx, "down", "--run-dir", str(run_dir), "--grace", "60")
        chunks += list(stream)
        stopped = down.result()
    assert stopped.returncode == 0 and "was killed" not in stopped.stderr, stopped.stdout + stopped.stderr
    texts = [c for c in chunks if c.choices]
    assert texts[-1].choices[0].finish_reason == "length"
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert not usage or usage[-1].completion_tokens == 400


def _local_texts(checkpoint, precision: str) -> list[str]:
    model = load_for_precision(checkpoint, parse_precision(precision))
    tok = TextTokenizer.load(checkpoint)
    return [tok.decode(list(generate(model, tok.encode(p), SamplingParams(max_tokens=8)))) for p in PROMPTS]


SERVICE_TYPES = {"gateway", "prefill", "decode", "npu_emulator", "ub_fabric", "kvcache"}


def _cmx_trace_right_away(run_dir, request_id: str) -> None:
    """`cmx trace` the moment the request has ended prints the whole trace: every service type.
    Then `cmx demo` (what `make run` shows): its second long prompt's prefix comes from the context
    cache, and its modeled TTFT includes that prefix's transfer from the pool; the first's does not."""
    shown = cmx("trace", request_id, "--run-dir", str(run_dir), "--all")
    assert shown.returncode == 0, shown.stderr
    header, *tree = shown.stdout.splitlines()
    assert set(header.split(" from ")[1].split(", ")) == SERVICE_TYPES, header
    assert tree[0].startswith("gateway.generate  [gateway-0]")
    assert any(line.strip().startswith("/cmx.decode.v1.Decode/Decode") and "[decode-0]" in line for line in tree)
    demo = cmx("demo", "--run-dir", str(run_dir), "--max-tokens", "4")
    assert demo.returncode == 0, demo.stderr
    pool_ms = [float(line.split("over UB ")[1].split(" ms")[0]) for line in demo.stdout.splitlines()
               if "modeled CloudMatrix384: TTFT" in line]
    assert len(pool_ms) == 3 and pool_ms[1] == 0.0 and pool_ms[2] > 0.0, demo.stdout
    assert "trace of request" in demo.stdout and "(incomplete" not in demo.stdout
    eplb = cmx("eplb", "--from-dies", "ddie", "--run-dir", str(run_dir), "--dies", "2", "--redundant", "2")
    assert eplb.returncode == 0, eplb.stderr
    rows = [line.split() for line in eplb.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "mean"] and float(rows[-1][2]) <= float(rows[-1][1])


def test_fp32_with_two_prefill_instances_and_a_full_trace(tmp_path, tiny_checkpoint, otlp_receiver):
    completions, run_dir = _serve_and_complete(tmp_path, tiny_checkpoint, "fp32", prefill_instances=2,
                                               otlp_endpoint=f"127.0.0.1:{otlp_receiver.port}",
                                               after=_cmx_trace_right_away)
    assert [c.choices[0].text for c in completions[:-1]] == _local_texts(tiny_checkpoint, "fp32")
    spans = read_spans(run_dir / "spans")
    served_by = {s["resource"]["service.instance.id"] for s in spans
                 if s["name"] == "/cmx.prefill.v1.Prefill/PrefillStream" and s["kind"].endswith("SERVER")}
    assert {s["resource"]["service.name"] for s in spans} >= {"gateway", "prefill", "decode", "npu_emulator",
                                                              "ub_fabric", "kvcache"}  # semantic conventions
    assert served_by == {"prefill0-0", "prefill1-0"}  # the gateway used both prefill instances
    request_id = completions[-1].id.split("-", 1)[1]
    trace = trace_of_request(spans, request_id)
    names = {s["name"] for s in trace}
    for expected in ("gateway.generate", "/cmx.prefill.v1.Prefill/PrefillStream", "/cmx.kvcache.v1.KvCacheShard/Put",
                     "/cmx.npu.v1.NpuEmulator/Forward", "fabric.dispatch", "/cmx.decode.v1.Decode/Decode"):
        assert expected in names, expected
    assert not any("prompt" in k and isinstance(v, str) for s in trace for k, v in s["attributes"].items())
    # The same trace reached the OTLP receiver (`cmx down` flushed every exporter), once.
    exported = otlp_receiver.trace_of(request_id)
    assert len({s["trace_id"] for s in exported}) == 1
    assert {s["resource"]["service.name"] for s in exported} == SERVICE_TYPES
    assert {s["resource"]["service.instance.id"] for s in exported} >= {"gateway-0", "decode-0", "fabric-0"}
    assert sorted(s["name"] for s in exported) == sorted(s["name"] for s in trace)


@pytest.mark.parametrize("prefill_instances", [1, 2])
def test_int8_pasa_equals_the_local_engine(tmp_path, tiny_checkpoint, prefill_instances):
    completions, _ = _serve_and_complete(tmp_path, tiny_checkpoint, "int8-pasa", prefill_instances,
                                         in_flight_at_down=prefill_instances == 1)
    assert [c.choices[0].text for c in completions[:-1]] == _local_texts(tiny_checkpoint, "int8-pasa")


def test_mutual_tls_end_to_end_with_an_api_key_and_nothing_secret_in_logs_or_spans(tmp_path, tiny_checkpoint):
    """Every gRPC plane under mutual TLS (fabric links, dies, pool, instances, gateway): a
    completion is served, a plaintext client reaches no process, and after the run no log line or
    span holds the prompt, the completion or the API key."""
    key = "sk-cmx-" + uuid.uuid4().hex
    prompt = "Quartz zebras whisper vermilion passwords beneath the supernode"
    run_dir = tmp_path / "run-tls"
    topo = _topology(tmp_path / "tls.yaml", tiny_checkpoint, "fp32", 1, tls=True, api_key=key)
    up = cmx("up", "--topology", str(topo), "--run-dir", str(run_dir))
    assert up.returncode == 0, up.stderr
    try:
        port = json.loads(next((run_dir / "ready").glob("gateway*.http.json")).read_text())["http_port"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        completion = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=16,
                                               temperature=0)
        assert completion.usage.completion_tokens == 16
        addresses = [r["host"] + ":" + str(r["port"]) for r in json.loads((run_dir / "state.json").read_text())
                     ["processes"]]
        assert len(addresses) == 9 and all(health_check_sync(a, timeout=2.0) != "SERVING" for a in addresses)
        status = cmx("status", "--run-dir", str(run_dir))  # the CLI uses the run's client certificate
        assert status.stdout.count("SERVING") == 9, status.stdout
    finally:
        down = cmx("down", "--run-dir", str(run_dir))
    assert down.returncode == 0, down.stderr
    secrets = [key, prompt, prompt.split()[2]] + ([completion.choices[0].text] if len(completion.choices[0].text) >= 12
                                                  else [])
    files = [*(run_dir / "logs").glob("*.log"), *(run_dir / "spans").glob("*.jsonl*")]
    assert len(files) >= 16
    leaks = [(f.name, s) for f in files for s in secrets if s in f.read_text(errors="replace")]
    assert leaks == []
