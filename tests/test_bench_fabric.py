"""`cmx bench fabric --quick`: ping-pong, rounds through a real fabric process, modeled vs paper."""
from __future__ import annotations

import json
import subprocess
import sys


def test_quick_fabric_bench_reports_measured_and_modeled(tmp_path):
    cmd = [sys.executable, "-m", "cloudmatrix.cli.main", "bench", "fabric", "--quick", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "fabric.json").read_text())
    assert report["grpc_pingpong_rtt_s"] > 0
    assert {(r["ep"], r["tokens_per_die"]) for r in report["rounds"]} == {(2, 1), (2, 32), (4, 1), (4, 32)}
    assert all(r["round_pair_s"] > 0 and r["bytes_per_round_pair"] > 0 for r in report["rounds"])
    modeled = {(m["op"], m["ep"]): m["latency_us"] for m in report["modeled_910c"]}
    paper = {(p["op"], p["ep"]): p["latency_us"] for p in report["paper"]}
    assert modeled.keys() == paper.keys()
    assert all(abs(modeled[k] - paper[k]) <= 0.1 * paper[k] for k in paper)
