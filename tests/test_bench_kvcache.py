"""`cmx bench kvcache --quick`: raw vs pool throughput, Lookup latency, model load from pool vs disk."""
from __future__ import annotations

import json
import subprocess
import sys


def test_quick_kvcache_bench_reports_every_number(tmp_path):
    cmd = [sys.executable, "-m", "cloudmatrix.cli.main", "bench", "kvcache", "--quick", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "kvcache.json").read_text())
    assert report["raw_grpc"]["client_stream_mbps"] > 0 and report["raw_grpc"]["server_stream_mbps"] > 0
    pool = report["pool_r1_one_shard"]
    assert pool["put_mbps"] > 0 and 0 < pool["put_vs_raw"] and 0 < pool["get_vs_raw"]
    assert 0 < report["lookup"]["p50_s"] <= report["lookup"]["p99_s"]
    load = report["model_load"]
    assert load["pool_s"] > 0 and load["disk_s"] > 0 and load["units"] == 1 + 3 * 16  # shared + 48 experts
