"""Shared fixtures: a tiny checkpoint made once per test session."""
from __future__ import annotations

import pytest
import torch

from cloudmatrix.model.presets import create_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return create_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)
