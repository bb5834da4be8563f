"""Model caching (the paper's EMS model cache): checkpoint weights as blobs in the KV pool, so a
die loads its weights from the pooled memory instead of the checkpoint's disk; the first loader
publishes what it read.

A checkpoint is cut into units that dies need whole: ``shared`` (every non-expert tensor of the
main model: every die holds them), ``mtp`` (the MTP module's, for dies that run it) and one unit
per routed expert per layer (``layers.<l>.experts.<e>``: only the dies hosting it). Each unit is one blob, ``<prefix>/<unit>``, holding the unit's tensors in the
safetensors format.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cloudmatrix.model.checkpoint import read_state_dict
from cloudmatrix.model.config import load_config

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
SHARED = "shared"
MTP = "mtp"


def unit_of(key: str, cfg) -> str:
    """The unit of a checkpoint key."""
    match = _EXPERT_KEY.match(key)
    if match:
        return f"layers.{match.group(1)}.experts.{match.group(2)}"
    return MTP if key.startswith(f"model.layers.{cfg.num_hidden_layers}.") else SHARED


def blob_name(prefix: str, unit: str) -> str:
    return f"{prefix.rstrip('/')}/{unit}"


@dataclasses.dataclass
class CacheReport:
    """Where a load's units came from."""

    from_pool: list[str] = dataclasses.field(default_factory=list)
    from_disk: list[str] = dataclasses.field(default_factory=list)

    @property
    def fully_cached(self) -> bool:
        return bool(self.from_pool) and not self.from_disk


async def load_units(client, prefix: str, checkpoint_dir: str | Path, units: list[str],
                     report: CacheReport, mtp: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``units``: from the pool when their blob is there, otherwise from the
    checkpoint on disk, publishing the blob for the next loader."""
    state: dict[str, torch.Tensor] = {}
    cfg = load_config(checkpoint_dir)
    for unit in units:
        blob = await client.get_blob(blob_name(prefix, unit))
        if blob is not None:
            state.update(load_safetensors(blob))
            report.from_pool.append(unit)
            continue
        tensors = read_state_dict(checkpoint_dir, cfg, keep=lambda k, u=unit: unit_of(k, cfg) == u, mtp=mtp)
        if not tensors:
            raise ValueError(f"model cache: unit {unit!r} has no tensors in {checkpoint_dir}")
        await client.put_blob(blob_name(prefix, unit), save_safetensors({k: v.contiguous() for k, v in tensors.items()}))
        state.update(tensors)
        report.from_disk.append(unit)
    return state


def units_for(keep: Callable[[str], bool], cfg, mtp: bool = False) -> list[str]:
    """The units a die with expert filter ``keep`` needs: shared + its experts (with ``mtp``, the
    MTP module's non-expert tensors and its experts too)."""
    units = [SHARED, MTP] if mtp else [SHARED]
    for layer in cfg.moe_layers(mtp):
        units += [f"layers.{layer}.experts.{e}" for e in range(cfg.n_routed_experts)
                  if keep(f"model.layers.{layer}.mlp.experts.{e}.")]
    return units
