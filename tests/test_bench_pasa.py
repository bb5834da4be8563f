"""`cmx bench pasa --quick` end to end, in-process: table, JSON structure, heatmap PNG, the headline."""
from __future__ import annotations

import argparse
import json

import pytest

from cloudmatrix.bench import pasa as pasa_bench

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("pasa")
    parser = argparse.ArgumentParser()
    pasa_bench.register(parser.add_subparsers())
    args = parser.parse_args(["pasa", "--quick", "--out", str(out)])
    assert args.handler(args) == 0
    return out


def test_quick_study_writes_json_with_every_case_and_mode(quick_study, capsys):
    study = json.loads((quick_study / "pasa_study.json").read_text())
    assert study["benchmark"] == "pasa" and study["quick"] is True
    assert study["threads"] >= 1
    params = study["params"]
    assert params["q_heads"] % params["kv_heads"] == 0 and params["head_dim"] == 128
    assert {"seq_len", "beta", "scale", "tile_kv", "seed", "generation"} <= params.keys()
    assert {c["distribution"] for c in study["cases"]} == {"uniform", "hybrid", "resonance"}
    for case in study["cases"]:
        assert set(case["results"]) == set(pasa_bench.MODES)
        for result in case["results"].values():
            assert {"nonfinite", "rmse", "rmse_rel_v", "rmse_rel_o", "wall_s"} <= result.keys()
        assert case["results"]["fp64"]["rmse_rel_o"] < 1e-10


def test_quick_study_writes_png(quick_study):
    png = quick_study / "pasa_study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mean30_small_amplitude_overflows_naive_fp16_but_not_pasa(quick_study):
    study = json.loads((quick_study / "pasa_study.json").read_text())
    case = next(c for c in study["cases"]
                if c["distribution"] == "uniform" and c["mean"] == 30 and c["amplitude"] == 0.5)
    assert case["results"]["fp16-naive"]["nonfinite"] > 0
    assert case["results"]["fp16-naive"]["rmse"] is None  # inf/NaN is written as null
    for mode in ("pasa", "pasa-hybrid"):
        assert case["results"][mode]["nonfinite"] == 0
        assert case["results"][mode]["rmse_rel_o"] < 1e-2
