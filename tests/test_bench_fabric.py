"""`cmx bench fabric --quick`: ping-pong, rounds through a real fabric process, modeled vs paper."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cloudmatrix.costmodel import ub


def test_quick_fabric_bench_reports_measured_and_modeled(tmp_path):
    cmd = [sys.executable, "-m", "cloudmatrix.cli.main", "bench", "fabric", "--quick", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "fabric.json").read_text())
    assert report["grpc_pingpong_rtt_s"] > 0
    assert {(r["ep"], r["tokens_per_die"]) for r in report["rounds"]} == {(2, 1), (2, 32), (4, 1), (4, 32)}
    assert all(r["round_pair_s"] > 0 and r["bytes_per_round_pair"] > 0 for r in report["rounds"])
    # the modeled rows are the cost model's (held-out checks of the model: test_simulator.py)
    modeled = {(m["op"], m["ep"]): m["latency_us"] for m in report["modeled_910c"]}
    paper = {(p["op"], p["ep"]): p["latency_us"] for p in report["paper"]}
    assert modeled.keys() == paper.keys()
    for (op, ep), latency_us in modeled.items():
        expected = ub.modeled_dispatch_combine(ep)[0 if op == "dispatch" else 1].latency_us
        assert latency_us == pytest.approx(expected)
