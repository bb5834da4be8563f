"""Serving precisions end to end: INT8 weights and PASA attention inside the model."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cloudmatrix.checkpoints import is_int8, load_for_precision, load_model
from cloudmatrix.model.precision import PRECISIONS, parse_precision


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    ids = torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(17))
    positions = torch.arange(40).expand(2, -1)
    return ids, positions, model(ids, positions, model.new_cache())


@pytest.mark.parametrize("core,bound", [("pasa", 1e-3), ("pasa-hybrid", 1e-3), ("fp16-naive", 1e-3)])
def test_fp16_attention_cores_stay_close_to_fp32(tiny_checkpoint, reference, core, bound):
    ids, positions, ref = reference
    model = load_model(tiny_checkpoint)
    model.attention.core = core
    got = model(ids, positions, model.new_cache())
    assert torch.isfinite(got).all() and 0 < _rel_l2(got, ref) < bound


def test_int8_pasa_precision_quantizes_and_switches_the_core(tiny_checkpoint, reference):
    ids, positions, ref = reference
    model = load_for_precision(tiny_checkpoint, parse_precision("int8-pasa"))
    assert is_int8(model) and model.attention.core == "pasa"
    got = model(ids, positions, model.new_cache())
    assert torch.isfinite(got).all() and _rel_l2(got, ref) < 0.1


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="'fp8'"):
        parse_precision("fp8")
    assert set(PRECISIONS) == {"fp32", "int8", "pasa", "int8-pasa"}


def test_cli_generate_runs_in_int8_pasa(tiny_checkpoint):
    cmd = [sys.executable, "-m", "cloudmatrix.cli.main", "generate", "--local", "--precision", "int8-pasa",
           "--checkpoint", str(tiny_checkpoint), "--max-tokens", "12", "The supernode"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("The supernode") and "12 tokens" in run.stderr
