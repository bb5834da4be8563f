"""`cmx up / status / down` with real service processes, and topology validation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from cloudmatrix.launcher.processes import ProcessRecord, is_alive
from cloudmatrix.launcher.topology import load_topology, parse_topology
from cmx.npu.v1 import npu_pb2, npu_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def cmx(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudmatrix.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def _write_topology(path: Path, dies: int, bad_die: int | None = None) -> Path:
    services = [{"name": "die", "service": "npu_emulator", "count": dies, "set": {"num_dies": dies},
                 "set_each": ["die_id={index}"]}]
    if bad_die is not None:
        services.append({"name": "broken", "service": "npu_emulator", "set": {"num_dies": 2, "die_id": bad_die}})
    path.write_text(yaml.safe_dump({"name": "test", "services": services}))
    return path


def _records(run_dir: Path) -> list[ProcessRecord]:
    return [ProcessRecord(**p) for p in json.loads((run_dir / "state.json").read_text())["processes"]]


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    yield run
    if (run / "state.json").exists():  # never leave processes behind, whatever the test did
        cmx("down", "--run-dir", str(run), "--grace", "5")


def test_up_status_down_with_real_processes(tmp_path, run_dir):
    topo = _write_topology(tmp_path / "topo.yaml", dies=2)
    up = cmx("up", "--topology", str(topo), "--run-dir", str(run_dir))
    assert up.returncode == 0, up.stderr
    records = _records(run_dir)
    assert [r.name for r in records] == ["die-0", "die-1"] and all(map(is_alive, records))
    for i, record in enumerate(records):
        with grpc.insecure_channel(record.address) as channel:
            info = npu_pb2_grpc.NpuEmulatorStub(channel).GetDieInfo(npu_pb2.GetDieInfoRequest(), timeout=5)
        assert (info.die_id, info.num_dies) == (i, 2)
        assert Path(record.log).is_file()
    groups = json.loads((run_dir / "prometheus_targets.json").read_text())  # a Prometheus file_sd file
    assert [g["labels"]["cmx_process"] for g in groups] == ["die-0", "die-1"]
    for group, record in zip(groups, records):
        assert group["targets"] == [f"127.0.0.1:{record.metrics_port}"] and group["labels"]["job"] == "cmx"
        with urllib.request.urlopen(f"http://{group['targets'][0]}/metrics", timeout=10) as page:
            assert page.status == 200
    config = yaml.safe_load((run_dir / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(run_dir / "prometheus_targets.json")]
    status = cmx("status", "--run-dir", str(run_dir))
    assert status.returncode == 0 and status.stdout.count("SERVING") == 2
    assert all(r.address in status.stdout for r in records)
    down = cmx("down", "--run-dir", str(run_dir))
    assert down.returncode == 0, down.stderr
    assert not any(map(is_alive, records))
    assert all('"msg": "stopped"' in Path(r.log).read_text() for r in records)  # drained, not killed
    assert cmx("status", "--run-dir", str(run_dir)).returncode != 0


def test_a_process_that_fails_makes_up_exit_nonzero_and_stops_the_rest(tmp_path, run_dir):
    topo = _write_topology(tmp_path / "topo.yaml", dies=1, bad_die=7)
    up = cmx("up", "--topology", str(topo), "--run-dir", str(run_dir))
    assert up.returncode != 0
    log = run_dir / "logs" / "broken-0.log"
    assert "broken-0" in up.stderr and str(log) in up.stderr
    assert "die_id" in log.read_text()  # the service's own one-line config error
    assert not (run_dir / "state.json").exists()
    assert "stopped" in (run_dir / "logs" / "die-0.log").read_text()


def test_health_timeout_names_the_process(tmp_path, run_dir):
    topo = _write_topology(tmp_path / "topo.yaml", dies=1)
    up = cmx("up", "--topology", str(topo), "--run-dir", str(run_dir), "--timeout", "0")
    assert up.returncode != 0 and "did not report SERVING" in up.stderr and "die-0" in up.stderr


@pytest.mark.parametrize("name", ["local.yaml", "paper.yaml"])
def test_shipped_topologies_parse(name):
    topology = load_topology(REPO / "topologies" / name)
    assert topology.processes and all(p.service for p in topology.processes)


@pytest.mark.parametrize("raw,needle", [
    ({}, "topology.services"),
    ({"services": [{"service": "teleporter"}]}, "services[0].service"),
    ({"services": [{"service": "npu_emulator", "count": 0}]}, "services[0].count"),
    ({"services": [{"service": "npu_emulator", "port": 70000}]}, "services[0].port"),
    ({"services": [{"service": "npu_emulator"}, {"service": "npu_emulator"}]}, "repeat"),
    ({"otlp_endpoint": "no port here", "services": [{"service": "npu_emulator"}]}, "topology.otlp_endpoint"),
    ({"otlp_endpoint": 4317, "services": [{"service": "npu_emulator"}]}, "topology.otlp_endpoint"),
])
def test_bad_topologies_name_the_field(raw, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_topology(raw, Path("."))


def test_one_otlp_switch_reaches_every_process_and_a_process_setting_still_wins():
    raw = {"otlp_endpoint": "collector:4317", "services": [
        {"name": "die", "service": "npu_emulator", "count": 2},
        {"name": "gateway", "service": "gateway", "set": {"server.otlp_endpoint": "other:4317"}}]}
    topology = parse_topology(raw, Path("."))
    assert topology.otlp_endpoint == "collector:4317"
    for spec in topology.processes:  # later overrides win in load_config
        assert spec.overrides[0] == "server.otlp_endpoint=collector:4317"
    assert topology.processes[-1].overrides[-1] == "server.otlp_endpoint=other:4317"
    # `cmx up --otlp-endpoint` on a topology without one
    plain = parse_topology({"services": raw["services"][:1]}, Path("."))
    assert plain.otlp_endpoint is None and plain.with_otlp_endpoint(None) is plain
    switched = plain.with_otlp_endpoint("127.0.0.1:4317")
    assert all(s.overrides[0] == "server.otlp_endpoint=127.0.0.1:4317" for s in switched.processes)
    with pytest.raises(ValueError, match="otlp_endpoint"):
        plain.with_otlp_endpoint("nowhere")


def test_instance_generation_equals_the_local_engine(tmp_path, run_dir, tiny_checkpoint):
    topo = tmp_path / "ep4.yaml"
    topo.write_text(yaml.safe_dump({"name": "ep4", "services": [
        {"name": "kvcache", "service": "kvcache"}, {"name": "fabric", "service": "ub_fabric"},
        {"name": "die", "service": "npu_emulator", "count": 4}]}))
    up = cmx("up", "--topology", str(topo), "--run-dir", str(run_dir))
    assert up.returncode == 0, up.stderr
    args = ["--checkpoint", str(tiny_checkpoint), "--max-tokens", "10", "The supernode"]
    distributed = cmx("generate", "--instance", str(run_dir), *args)
    local = cmx("generate", "--local", *args)
    assert distributed.returncode == 0, distributed.stderr
    assert distributed.stdout == local.stdout  # greedy: the EP4 instance computes what one process does
    assert "EP4 over the fabric" in distributed.stderr and "modeled CloudMatrix384" in distributed.stderr


def test_references_start_in_waves_and_resolve_to_addresses():
    from cloudmatrix.launcher.processes import ProcessRecord
    from cloudmatrix.launcher.waves import resolve, waves
    topo = parse_topology({"services": [
        {"name": "gw", "service": "gateway", "set": {"prefill": "{addresses:pf}"}},
        {"name": "pf", "service": "prefill", "set": {"dies": "{addresses:die}"}},
        {"name": "die", "service": "npu_emulator", "count": 2},
    ]}, Path("."))
    assert [[p.name for p in w] for w in waves(topo.processes)] == [["die-0", "die-1"], ["pf-0"], ["gw-0"]]
    records = [ProcessRecord(f"die-{i}", "npu_emulator", 1, "", "", "127.0.0.1", 5000 + i) for i in range(2)]
    assert resolve(topo.processes[1], records).overrides == ("dies=127.0.0.1:5000,127.0.0.1:5001",)


@pytest.mark.parametrize("services,needle", [
    ([{"name": "a", "service": "prefill", "set": {"x": "{addresses:b}"}},
      {"name": "b", "service": "decode", "set": {"y": "{addresses:a}"}}], "cycle"),
    ([{"name": "a", "service": "prefill", "set": {"x": "{addresses:nope}"}}], "unknown entries"),
])
def test_bad_references_are_reported(services, needle):
    from cloudmatrix.launcher.waves import waves
    with pytest.raises(ValueError, match=needle):
        waves(parse_topology({"services": services}, Path(".")).processes)


def test_up_checks_the_topology_inputs_before_starting_anything(run_dir):
    up = cmx("up", "--topology", "topologies/local.yaml", "--run-dir", str(run_dir))
    assert up.returncode == 2 and "Traceback" not in up.stderr
    assert "prefill-0, decode-0, gateway-0: checkpoint: no config.json in" in up.stderr
    assert not (run_dir / "state.json").exists() and not (run_dir / "logs").exists()


def test_down_counts_the_processes_that_had_already_exited(tmp_path, run_dir):
    topo = _write_topology(tmp_path / "topo.yaml", dies=2)
    assert cmx("up", "--topology", str(topo), "--run-dir", str(run_dir)).returncode == 0
    victim = _records(run_dir)[1]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while is_alive(victim) and time.monotonic() < deadline:
        time.sleep(0.05)
    down = cmx("down", "--run-dir", str(run_dir))
    assert down.returncode == 0 and "stopped 1 processes; 1 had already exited: die-1" in down.stdout


def test_status_into_a_closed_pipe_exits_without_a_traceback(tmp_path, run_dir):
    topo = _write_topology(tmp_path / "topo.yaml", dies=1)
    assert cmx("up", "--topology", str(topo), "--run-dir", str(run_dir)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "cloudmatrix.cli.main", "status", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before cmx writes (as `cmx status | head -0`)
    stderr = proc.communicate(timeout=60)[1].decode()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


def test_every_launcher_option_shows_its_default():
    for command, needles in (("up", ["(default: topologies/local.yaml)", "(default: runs/local)", "(default: 120.0)",
                                     "--otlp-endpoint HOST:PORT"]),
                             ("trace", ["(default: 15.0)", "(default: runs/local)", "(default: 80)", "--depth"]),
                             ("status", ["(default: runs/local)"]), ("down", ["(default: 15.0)"])):
        text = cmx(command, "--help").stdout
        assert all(n in " ".join(text.split()) for n in needles), text
