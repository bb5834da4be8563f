"""`cmx bench kernels --quick`: every comparison measured and reported, with sane numbers."""
from __future__ import annotations

import json
import subprocess
import sys


def test_quick_kernel_bench_reports_every_comparison(tmp_path):
    cmd = [sys.executable, "-m", "cloudmatrix.cli.main", "bench", "kernels", "--quick", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["threads"] == 1
    i8, pasa, mla = report["int8_linear"], report["pasa_attention"], report["mla_decode"]
    assert i8["fp32_s"] > 0 and i8["int8_s"] > 0 and i8["int8_rel_l2_error"] < 0.02
    assert pasa["sdpa_fp32_s"] > 0 and pasa["pasa_s"] > 0
    assert mla["max_abs_diff"] < 1e-4  # the paged absorbed step computes what the dense one does
    assert "INT8 W8A8 linear" in run.stdout and "MLA decode" in run.stdout
