"""`cmx bench compare --quick`: one run measures transformers, the in-process engine and the
suite in two precisions (it brings the topologies up and down itself); the JSON has every row,
consistent ratios and ordered percentiles."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloudmatrix.cli.main import main

pytestmark = pytest.mark.timeout(600)


def test_quick_compare_reports_every_row_and_ratio(tmp_path):
    topology = Path(__file__).resolve().parents[1] / "topologies" / "local.yaml"
    assert main(["bench", "compare", "--quick", "--topology", str(topology), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    rows = {r["system"]: r for r in report["rows"]}
    assert list(rows) == ["hf_static", "in_process", "suite_fp32", "suite_int8_pasa"]
    assert rows["suite_int8_pasa"]["precision"] == "int8-pasa" and rows["suite_fp32"]["precision"] == "fp32"
    base = rows["hf_static"]["output_tok_s"]
    for row in rows.values():
        assert row["output_tok_s"] > 0 and row["ratio_to_hf"] == pytest.approx(row["output_tok_s"] / base)
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] and 0 < row["tpot_p50_ms"] <= row["tpot_p99_ms"]
    assert rows["hf_static"]["ratio_to_hf"] == 1.0
    assert all(rows[s]["decode_seqs_per_step"] >= 1 for s in ("suite_fp32", "suite_int8_pasa"))
    assert all(len(report["samples"][s]) == 2 for s in rows)  # --quick: 2 interleaved repeats
    asked = report["config"]["requests"] * report["config"]["output_len"]
    for name, runs in report["samples"].items():
        for run in runs:  # every system generated exactly what was asked, and its rate is that over its time
            assert run["output_tokens"] == asked, (name, run["output_tokens"], asked)
            assert run["output_tok_s"] == pytest.approx(run["output_tokens"] / run["elapsed_s"])
        for metric in ("output_tok_s", "ttft_p50_ms", "tpot_p99_ms"):  # the median of two runs: their mean
            assert rows[name][metric] == pytest.approx((runs[0][metric] + runs[1][metric]) / 2)
