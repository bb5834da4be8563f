"""Resumable training state on disk, in safetensors and JSON only (no pickle).

``train_state/model.safetensors`` holds the fp32 weights and router biases under the model's own
keys, ``optimizer.safetensors`` AdamW's moments per parameter, ``progress.json`` the step, tokens,
elapsed seconds, the curves so far and the settings the run started with.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cloudmatrix.model.transformer import DeepseekV3

STATE_DIR = "train_state"
_MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def save_state(out: Path, model: DeepseekV3, optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """Write the state atomically: a crash mid-save leaves the previous state readable."""
    final = out / STATE_DIR
    tmp = out / (STATE_DIR + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file(_optimizer_tensors(model, optimizer), str(tmp / "optimizer.safetensors"))
    (tmp / "progress.json").write_text(json.dumps(progress, indent=1) + "\n")
    old = out / (STATE_DIR + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def load_state(out: Path, model: DeepseekV3, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights and optimizer moments; returns the progress dict."""
    where = out / STATE_DIR
    model.load_state_dict(load_file(str(where / "model.safetensors")), strict=True)
    moments = load_file(str(where / "optimizer.safetensors"))
    for name, param in model.named_parameters():
        if f"{name}.step" in moments:
            optimizer.state[param] = {m: moments[f"{name}.{m}"] for m in _MOMENTS}
    return json.loads((where / "progress.json").read_text())


def has_state(out: Path) -> bool:
    return (out / STATE_DIR / "progress.json").is_file()


def _optimizer_tensors(model: DeepseekV3, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param)
        if state:
            for m in _MOMENTS:
                out[f"{name}.{m}"] = torch.as_tensor(state[m]).detach().clone().contiguous()
    return out
