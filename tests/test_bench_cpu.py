"""CPU accounting of the serving benchmarks (bench/cpu.py): /proc readings of real processes, the
kind of every process of a run directory's topology, and the split per output token."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cloudmatrix.bench.cpu import (
    TopologyProcesses,
    allocator_settings,
    cpu_seconds,
    cpu_split,
    describe,
)

BUSY = "import time\nend = time.process_time() + {secs}\nwhile time.process_time() < end: pass\nimport sys; sys.stdin.read()"


def _state(tmp_path, processes: list[dict], specs: dict) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"topology": "t", "processes": processes, "specs": specs}))


def _proc(name: str, service: str, pid: int, port: int) -> dict:
    return {"name": name, "service": service, "pid": pid, "host": "127.0.0.1", "port": port, "log": f"{name}.log",
            "ready_file": f"{name}.json"}


def _spec(name: str, service: str, overrides: list[str]) -> dict:
    return {"name": name, "service": service, "host": "127.0.0.1", "port": 0, "config": None, "overrides": overrides}


def test_every_process_gets_its_kind_and_dies_their_instance(tmp_path):
    processes = [_proc("kv-0", "kvcache", 10, 1), _proc("kv-1", "kvcache", 11, 2), _proc("fabric-0", "ub_fabric", 12, 3),
                 _proc("pdie-0", "npu_emulator", 13, 4), _proc("ddie-0", "npu_emulator", 14, 5),
                 _proc("ddie-1", "npu_emulator", 15, 6), _proc("spare-0", "npu_emulator", 16, 7),
                 _proc("prefill-0", "prefill", 17, 8), _proc("decode-0", "decode", 18, 9), _proc("gw-0", "gateway", 19, 10)]
    specs = {"prefill-0": _spec("prefill-0", "prefill", ["precision=fp32", "dies=127.0.0.1:4"]),
             "decode-0": _spec("decode-0", "decode", ["dies={addresses:ddie}", "fabric={addresses:fabric}"]),
             "gw-0": _spec("gw-0", "gateway", ["decode={addresses:decode}"])}
    _state(tmp_path, processes, specs)
    kinds = TopologyProcesses.from_run_dir(tmp_path).kinds
    assert kinds == {10: "kvcache", 11: "kvcache", 12: "fabric", 13: "prefill dies", 14: "decode dies",
                     15: "decode dies", 16: "dies", 17: "prefill", 18: "decode", 19: "gateway"}
    layout = TopologyProcesses(kinds).layout()
    assert layout == {"gateway": 1, "prefill": 1, "prefill dies": 1, "decode": 1, "decode dies": 2, "fabric": 1,
                      "kvcache": 2, "dies": 1}


def test_the_split_follows_the_cpu_real_processes_spend(tmp_path):
    """A process that burns 0.6 s of CPU shows up with about that much; an idle one with almost
    none; a process that exits in between is reported as lost, not counted as zero."""
    children = [subprocess.Popen([sys.executable, "-c", BUSY.format(secs=secs)], stdin=subprocess.PIPE)
                for secs in (0.6, 0.0, 0.0)]
    try:
        kinds = {children[0].pid: "decode dies", children[1].pid: "gateway", children[2].pid: "fabric"}
        before = {pid: cpu_seconds(pid) for pid in kinds}
        deadline = time.monotonic() + 60
        while cpu_seconds(children[0].pid) - before[children[0].pid] < 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        children[2].communicate(b"", timeout=30)  # exits
        after = {pid: cpu_seconds(pid) for pid in kinds}
        assert after[children[2].pid] is None
        split = cpu_split(kinds, before, after, output_tokens=100)
    finally:
        for child in children:
            child.kill()
            child.wait()
    busy, idle = split["kinds"]["decode dies"], split["kinds"]["gateway"]
    assert 0.5 <= busy["cpu_s"] <= 5.0 and idle["cpu_s"] < 0.3
    assert busy["cpu_s_per_token"] == pytest.approx(busy["cpu_s"] / 100)
    assert sum(k["share"] for k in split["kinds"].values()) == pytest.approx(1.0)
    assert split["non_die_share"] == pytest.approx(idle["cpu_s"] / split["cpu_s"])
    assert split["lost_pids"] == [children[2].pid] and "fabric" not in split["kinds"]
    assert "outside the dies" in describe(split)


def test_a_process_that_is_gone_reads_none():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert cpu_seconds(child.pid) is None


def test_the_allocator_is_named_from_the_environment():
    assert allocator_settings({"HOME": "/root"}) == {"allocator": "glibc malloc", "env": {}, "mallopt": {}}
    env = {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2", "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PATH": "/bin"}
    assert allocator_settings(env, retain_bytes=2**20) == {"allocator": "jemalloc", "env": {
        "LD_PRELOAD": "/usr/lib/libjemalloc.so.2", "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"},
        "mallopt": {"M_MMAP_THRESHOLD": 32 * 2**20, "M_TRIM_THRESHOLD": 2**20}}


def test_a_topology_reports_the_malloc_settings_its_processes_apply(tmp_path):
    processes = [_proc("gw-0", "gateway", 1, 1)]
    _state(tmp_path, processes, {"gw-0": _spec("gw-0", "gateway", [])})
    assert TopologyProcesses.from_run_dir(tmp_path).allocator()["mallopt"]["M_TRIM_THRESHOLD"] == 256 * 2**20
    _state(tmp_path, processes, {"gw-0": _spec("gw-0", "gateway", ["server.malloc_retain_bytes=4096"])})
    assert TopologyProcesses.from_run_dir(tmp_path).allocator()["mallopt"]["M_TRIM_THRESHOLD"] == 4096
