"""`cmx bench compare --quick`: one run measures transformers and the in-process engine (each in
a process of its own, all cores and one thread) and the suite in two precisions (it brings each
topology up and down itself); the JSON has every row, consistent ratios, ordered percentiles,
each system's threads, process layout and allocator, and the suite's CPU split by process kind."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cloudmatrix.cli.main import main

pytestmark = pytest.mark.timeout(600)


def test_quick_compare_reports_every_row_and_ratio(tmp_path):
    topology = Path(__file__).resolve().parents[1] / "topologies" / "local.yaml"
    assert main(["bench", "compare", "--quick", "--plot", "--topology", str(topology), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    rows = {r["system"]: r for r in report["rows"]}
    cores = os.cpu_count()
    one_thread = ["hf_static_1t"] if cores > 1 else []
    in_process = ["in_process"] + (["in_process_1t"] if cores > 1 else [])
    assert list(rows) == ["hf_static"] + one_thread + in_process + ["suite_fp32", "suite_int8_pasa"]
    assert rows["hf_static"]["threads"] == rows["in_process"]["threads"] == cores
    assert all(rows[name]["threads"] == 1 for name in one_thread + in_process[1:])
    assert all(r["allocator"] for r in rows.values())
    assert rows["hf_static"]["mallopt"] == {} and rows["suite_fp32"]["mallopt"]["M_TRIM_THRESHOLD"] > 0
    for name in ("suite_fp32", "suite_int8_pasa"):  # every process's CPU, by kind, adds up to the total
        row, cpu = rows[name], rows[name]["cpu"]
        assert row["processes"] == {"gateway": 1, "prefill": 1, "prefill dies": 2, "decode": 1, "decode dies": 2,
                                    "fabric": 1, "kvcache": 2}
        assert set(cpu["kinds"]) == set(row["processes"])
        assert cpu["kinds"]["decode dies"]["cpu_s_per_token"] > 0 and 0 < cpu["non_die_share"] < 1
        for run in report["samples"][name]:
            assert sum(k["cpu_s"] for k in run["cpu"]["kinds"].values()) == pytest.approx(run["cpu_s"])
            assert run["cpu"]["lost_pids"] == []
    for row in rows.values():
        assert row["cpu_s_per_token"] > 0
        assert row["cpu_per_token_vs_hf"] == pytest.approx(row["cpu_s_per_token"] / rows["hf_static"]["cpu_s_per_token"])
    assert (tmp_path / "compare_cpu.png").stat().st_size > 0
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
            assert run["warmup_requests"] == report["config"]["requests"]  # served first, untimed, by the same system
            assert run["output_tok_s"] == pytest.approx(run["output_tokens"] / run["elapsed_s"])
        for metric in ("output_tok_s", "ttft_p50_ms", "tpot_p99_ms"):  # the median of two runs: their mean
            assert rows[name][metric] == pytest.approx((runs[0][metric] + runs[1][metric]) / 2)
