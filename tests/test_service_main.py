"""run_service in a real subprocess: serve, trace across processes, drain on SIGTERM, bad config."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import yaml
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from cloudmatrix.launcher.topology import entry_settings
from cloudmatrix.rpc.channel import health_check_sync, make_channel
from cloudmatrix.service_main import freeze_startup_objects
from tests.rpc_helpers import (
    ONE_SPAN,
    fetch,
    hex_id,
    memory_tracer_provider,
    read_spans,
    run,
)
from tests.test_kvcache_client import free_port

pytestmark = pytest.mark.timeout(60)


DEMO_SERVICE = '''
import asyncio
import gc
import os
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from cloudmatrix.config import ServerConfig
from cloudmatrix.service_main import ServiceParts, run_service


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, export_marker):
        self.export_marker = export_marker

    async def Export(self, request, context):
        if self.export_marker and request.resource_spans:
            with open(self.export_marker, "a") as f:
                attributes = {a.key: a.value.string_value for a in request.resource_spans[0].resource.attributes}
                f.write(attributes.get("service.instance.id", "") + "\\n")
        return trace_service_pb2.ExportTraceServiceResponse()


@dataclass(frozen=True)
class DemoConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    stop_marker: str = ""
    export_marker: str = ""   # the Sink notes every OTLP export it receives here
    hold_file: str = ""       # on_ready waits until this file exists (the process is not ready till then)


async def build(config):
    async def on_stop():
        with open(config.stop_marker, "w") as f:
            f.write("drained")
        with open(config.stop_marker + ".frozen", "w") as f:
            f.write(str(gc.get_freeze_count()))

    async def on_ready(host):
        while config.hold_file and not os.path.exists(config.hold_file):
            await asyncio.sleep(0.05)

    name = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
    registration = (trace_service_pb2_grpc.add_TraceServiceServicer_to_server, Sink(config.export_marker), name)
    return ServiceParts(registrations=[registration], on_stop=on_stop, on_ready=on_ready)


if __name__ == "__main__":
    run_service("demo", DemoConfig, build)
'''


@pytest.fixture
def spawn_demo(tmp_path):
    """Start the demo service script; every process it started is killed at teardown."""
    script = tmp_path / "demo_service.py"
    script.write_text(DEMO_SERVICE)
    procs: list[subprocess.Popen] = []

    def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CMX_DEMO__")}
        stderr = open(tmp_path / f"stderr-{len(procs)}.log", "w+")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, str(script), *args], env={**base, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path)
        proc.stderr_file = stderr
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr_file.close()


def wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        assert proc.poll() is None, f"service exited early with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"no ready file at {path} after {timeout_s}s")


async def traced_export(target: str, client_tp: TracerProvider):
    interceptors = aio_client_interceptors(tracer_provider=client_tp)
    async with make_channel(target, interceptors=interceptors) as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        with client_tp.get_tracer("test").start_as_current_span("probe"):
            return await stub.Export(ONE_SPAN, timeout=5)


def test_run_service_serves_then_drains_on_sigterm(tmp_path, spawn_demo):
    # A long grace: with nothing in flight the drain must not wait it out (exit well before it).
    ready_file, marker, grace_s = tmp_path / "ready.json", tmp_path / "drained", 60.0
    proc = spawn_demo("--set", f"server.grace_s={grace_s}", "--set", f"stop_marker={marker}",
                      env={"CMX_DEMO__SERVER__READY_FILE": str(ready_file),
                           "CMX_DEMO__SERVER__RUN_DIR": str(tmp_path / "run")})
    ready = wait_for_file(ready_file, proc)
    target = f"127.0.0.1:{ready['port']}"
    assert ready["pid"] == proc.pid and ready["service"] == "demo"
    assert health_check_sync(target) == "SERVING"
    client_tp, client_spans = memory_tracer_provider()
    run(traced_export(target, client_tp))
    fetch(f"http://127.0.0.1:{ready['metrics_port']}/metrics")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=grace_s / 2) == 0
    assert health_check_sync(target) == "UNREACHABLE"
    assert marker.read_text() == "drained" and not ready_file.exists()
    assert int(Path(f"{marker}.frozen").read_text()) > 10_000  # start-up objects left the collector

    proc.stderr_file.seek(0)
    logs = [json.loads(line) for line in proc.stderr_file.read().splitlines()]
    serving = next(line for line in logs if line["msg"] == "serving")
    assert (serving["service"], serving["port"], serving["metrics_port"]) == (
        "demo", ready["port"], ready["metrics_port"])

    client_span = next(s for s in client_spans.get_finished_spans() if s.kind.name == "CLIENT")
    spans = read_spans(tmp_path / "run" / "spans" / f"demo-{proc.pid}.jsonl")
    assert not any("grpc.health.v1.Health" in s["name"] for s in spans)  # probes are not traced
    server_span = next(s for s in spans if s["name"].endswith("TraceService/Export")
                       and s["trace_id"] == hex_id(client_span.context.trace_id, 32))
    assert server_span["parent_span_id"] == hex_id(client_span.context.span_id, 16)
    assert server_span["resource"] == {"service.name": "demo", "service.instance.id": "demo"}


def test_start_up_objects_leave_the_collector_and_later_garbage_is_still_collected():
    class Node:
        pass

    kept = Node()
    kept.self = kept
    try:
        freeze_startup_objects()
        assert not any(o is kept for o in gc.get_objects())  # frozen: no collection walks it again
        later = Node()
        later.self = later
        ref = weakref.ref(later)
        del later
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("args, env, message", [
    (("--set", "server.port=abc"), {}, "config error: server.port: expected int, got 'abc'"),
    ((), {"CMX_DEMO__SERVER__GRACE_S": "-1"}, "config error: server.grace_s: must be >= 0, got -1.0"),
    (("--set", "server.nope=1"), {}, "config error: server.nope: unknown key"),
])
def test_run_service_rejects_bad_config_with_exit_2(spawn_demo, args, env, message):
    proc = spawn_demo(*args, env=env)
    assert proc.wait(timeout=30) == 2
    proc.stderr_file.seek(0)
    assert proc.stderr_file.read() == message + "\n"


def test_liveness_is_serving_while_the_process_is_not_yet_ready(tmp_path, spawn_demo):
    """Kubernetes' liveness probe asks for "liveness": SERVING from the moment the server listens,
    while the readiness probe's overall health stays NOT_SERVING until the process is ready."""
    ready_file, hold = tmp_path / "ready.json", tmp_path / "hold"
    port = free_port()
    proc = spawn_demo("--set", f"server.port={port}", "--set", f"hold_file={hold}",
                      env={"CMX_DEMO__SERVER__READY_FILE": str(ready_file),
                           "CMX_DEMO__SERVER__RUN_DIR": str(tmp_path / "run")})
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while health_check_sync(target, service="liveness") != "SERVING":
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    assert health_check_sync(target) == "NOT_SERVING"
    hold.write_text("go")
    wait_for_file(ready_file, proc)
    assert health_check_sync(target) == "SERVING" and health_check_sync(target, service="liveness") == "SERVING"


def test_spans_go_to_the_endpoint_in_otel_exporter_otlp_endpoint(tmp_path, spawn_demo):
    marker = tmp_path / "exports"
    sink = spawn_demo("--set", f"export_marker={marker}", env={
        "CMX_DEMO__SERVER__READY_FILE": str(tmp_path / "sink.json"), "CMX_DEMO__SERVER__SPAN_FILES": "false"})
    sink_port = wait_for_file(tmp_path / "sink.json", sink)["port"]
    traced = spawn_demo("--set", "server.service_name=traced", env={
        "CMX_DEMO__SERVER__READY_FILE": str(tmp_path / "traced.json"), "CMX_DEMO__SERVER__RUN_DIR": str(tmp_path),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}"})
    traced_port = wait_for_file(tmp_path / "traced.json", traced)["port"]
    client_tp, _ = memory_tracer_provider()
    run(traced_export(f"127.0.0.1:{traced_port}", client_tp))  # a server span in "traced" ...
    deadline = time.monotonic() + 30
    while not (marker.exists() and "traced" in marker.read_text().split()):  # ... exported to the sink
        assert traced.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)


def test_a_real_service_takes_its_settings_from_a_topology_entry_below_its_env(tmp_path):
    """`--topology FILE --entry NAME --index N` (how a Kubernetes container reads its ConfigMap):
    the entry's set and set_each ({index} = N) apply, the environment wins over them."""
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump({"name": "t", "services": [
        {"name": "fab", "service": "ub_fabric", "count": 1,
         "set": {"server.metrics_port": -1, "hello_timeout_s": 7},
         "set_each": ["server.service_name=fab-{index}"]}]}))
    ready = tmp_path / "ready.json"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CMX_")},
           "CMX_UB_FABRIC__SERVER__READY_FILE": str(ready), "CMX_UB_FABRIC__SERVER__RUN_DIR": str(tmp_path),
           "CMX_UB_FABRIC__SERVER__METRICS_PORT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "services.ub_fabric", "--topology", str(topology), "--entry", "fab",
                             "--index", "3"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        info = wait_for_file(ready, proc)
        assert info["service"] == "fab-3"  # set_each, index 3 (beyond count: an autoscaler's pod)
        assert isinstance(info["metrics_port"], int)  # the env's metrics port over the entry's -1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("entry, extra, message", [
    ("nope", {}, "no entry named 'nope'"),
    ("fab", {"set": {"fabric": "{addresses:fab}"}}, "only `cmx up` fills in {addresses:fab}"),
    ("fab", {"set_each": ["server.run_dir={run_dir}/x"]}, "only `cmx up` fills in {run_dir}"),
    ("die", {}, "runs service 'npu_emulator', not 'ub_fabric'"),
])
def test_a_topology_entry_that_cannot_configure_the_process_exits_2_naming_why(tmp_path, entry, extra, message):
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump({"name": "t", "services": [
        {"name": "fab", "service": "ub_fabric", **extra}, {"name": "die", "service": "npu_emulator"}]}))
    run_ = subprocess.run([sys.executable, "-m", "services.ub_fabric", "--topology", str(topology), "--entry", entry],
                          capture_output=True, text=True, timeout=60)
    assert run_.returncode == 2 and "config error: topology:" in run_.stderr and message in run_.stderr, run_.stderr


def test_a_topology_with_tls_is_refused_outside_cmx_up(tmp_path):
    topology = tmp_path / "topology.yaml"
    services = [{"name": "fab", "service": "ub_fabric"}]
    topology.write_text(yaml.safe_dump({"name": "t", "tls": True, "services": services}))
    with pytest.raises(ValueError, match="server.tls_ca"):
        entry_settings(topology, "fab", 0, "ub_fabric")


def test_the_interceptor_filter_traces_every_rpc_but_health_checks_and_fabric_attach():
    import grpc

    from cloudmatrix.telemetry.tracing import FABRIC_ATTACH, traced_rpc

    def client(method: str):  # grpc.aio hands client interceptors the method as bytes
        return grpc.aio.ClientCallDetails(method.encode(), None, None, None, None)

    class Server:  # the grpc.aio server's call details: a str method
        def __init__(self, method: str) -> None:
            self.method = method

    for details in (client, Server):
        assert traced_rpc(details("/cmx.npu.v1.NpuEmulator/Forward"))
        assert traced_rpc(details("/cmx.kvcache.v1.KvCache/Put"))
        assert not traced_rpc(details("/grpc.health.v1.Health/Check"))
        assert not traced_rpc(details("/grpc.health.v1.Health/Watch"))
        assert not traced_rpc(details(FABRIC_ATTACH))
