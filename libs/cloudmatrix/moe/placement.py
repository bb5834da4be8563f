"""Expert placement: which dies host a copy of each routed expert of each MoE layer.

An expert may have several replicas (the paper's redundant experts); the tokens routed to it are
then split between its replicas by token index, so every replica gets an equal share.
Shape legend: T = tokens, K = experts per token.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from cloudmatrix.errors import FieldError


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    """replicas[layer][expert] = the dies hosting that expert (at least one, no repeats)."""

    num_dies: int
    num_experts: int
    replicas: dict[int, tuple[tuple[int, ...], ...]]

    def __post_init__(self) -> None:
        for layer, experts in self.replicas.items():
            if len(experts) != self.num_experts:
                raise FieldError("placement", f"layer {layer}: {len(experts)} experts listed, expected {self.num_experts}")
            for expert, dies in enumerate(experts):
                if not dies or len(set(dies)) != len(dies) or not all(0 <= d < self.num_dies for d in dies):
                    raise FieldError("placement", f"layer {layer} expert {expert}: dies {list(dies)} must be "
                                     f"distinct ids in [0, {self.num_dies})")

    @classmethod
    def round_robin(cls, layers: list[int], num_experts: int, num_dies: int) -> "ExpertPlacement":
        """Expert e on die e % num_dies, one copy each (the default)."""
        experts = tuple((e % num_dies,) for e in range(num_experts))
        return cls(num_dies, num_experts, {layer: experts for layer in layers})

    @property
    def layers(self) -> list[int]:
        return sorted(self.replicas)

    def experts_on(self, die: int, layer: int) -> list[int]:
        return [e for e, dies in enumerate(self.replicas[layer]) if die in dies]

    def destinations(self, layer: int, expert_ids: torch.Tensor) -> torch.Tensor:
        """expert_ids: [T, K] -> the die each (token, expert) pair goes to: [T, K].

        With n replicas, token t goes to replica t % n (a deterministic, even split).
        """
        table = self._replica_table(layer)  # [E, max_replicas], padded by repeating
        counts = torch.tensor([len(d) for d in self.replicas[layer]])
        token = torch.arange(expert_ids.shape[0])[:, None].expand_as(expert_ids)
        return table[expert_ids, token % counts[expert_ids]]

    def _replica_table(self, layer: int) -> torch.Tensor:
        experts = self.replicas[layer]
        width = max(len(d) for d in experts)
        return torch.tensor([list(d) + [d[0]] * (width - len(d)) for d in experts])

    def to_json(self) -> dict:
        return {"num_dies": self.num_dies, "num_experts": self.num_experts,
                "layers": {str(layer): [list(d) for d in experts] for layer, experts in self.replicas.items()}}

    @classmethod
    def from_json(cls, raw: dict) -> "ExpertPlacement":
        try:
            replicas = {int(layer): tuple(tuple(int(d) for d in dies) for dies in experts)
                        for layer, experts in raw["layers"].items()}
            return cls(int(raw["num_dies"]), int(raw["num_experts"]), replicas)
        except (KeyError, TypeError, ValueError) as exc:
            raise FieldError("placement", f"malformed ({exc})") from exc

    @classmethod
    def load(cls, path: str | Path) -> "ExpertPlacement":
        return cls.from_json(json.loads(Path(path).read_text()))
