"""Shared fixtures: a tiny checkpoint, and the shipped model's INT8 copy, made once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cloudmatrix.model.presets import create_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return create_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def shipped_int8(tmp_path_factory):
    """`cmx quantize` of models/cmx-tiny-py (INT8 W8A8, its MTP module included)."""
    from cloudmatrix.cli.main import main

    out = tmp_path_factory.mktemp("shipped-int8") / "cmx-tiny-py-int8"
    assert main(["quantize", "--checkpoint", str(Path(__file__).resolve().parents[1] / "models" / "cmx-tiny-py"),
                 "--out", str(out)]) == 0
    return out
