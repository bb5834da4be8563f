"""Tokens per routed expert, per MoE layer, as the trained router chooses them on the test split.

Shape legend: M = MoE layers, E = routed experts.

``expert_load.json`` is in the format ``cmx eplb --stats`` reads (``token_counts`` [M, E] and
``layers``, the served MoE layers); the MTP module's router is reported beside it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cloudmatrix.model.moe import Router, Routing
from cloudmatrix.model.transformer import DeepseekV3


class ExpertCounter:
    """Counts, while attached, the experts every router of the model picks (one row per router)."""

    def __init__(self, model: DeepseekV3) -> None:
        n = model.cfg.num_hidden_layers
        self.names: list[int] = []
        self.counts: list[torch.Tensor] = []
        self._handles = []
        routers = [(name, m) for name, m in model.named_modules() if isinstance(m, Router)]
        for name, router in routers:
            layer = int(name.split(".")[2]) if name.startswith("model.layers.") else n
            self.names.append(layer)
            self.counts.append(torch.zeros(router.cfg.n_routed_experts, dtype=torch.int64))
            self._handles.append(router.register_forward_hook(self._hook(len(self.counts) - 1)))

    def _hook(self, row: int):
        def hook(router: Router, args: tuple, routing: Routing) -> None:
            self.counts[row] += torch.bincount(routing.expert_ids.flatten(), minlength=len(self.counts[row]))
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def report(self, num_hidden_layers: int) -> dict:
        main = [(layer, c) for layer, c in zip(self.names, self.counts) if layer < num_hidden_layers]
        mtp = [c for layer, c in zip(self.names, self.counts) if layer >= num_hidden_layers]
        return {
            "layers": [layer for layer, _ in main],
            "token_counts": [c.tolist() for _, c in main],
            "max_over_mean": [round(max_over_mean(c), 4) for _, c in main],
            "mtp_layer": {"layer": num_hidden_layers, "token_counts": mtp[0].tolist(),
                          "max_over_mean": round(max_over_mean(mtp[0]), 4)} if mtp else None,
        }


def max_over_mean(counts: torch.Tensor) -> float:
    counts = counts.double()
    return float(counts.max() / counts.mean()) if counts.sum() else 0.0


def write_expert_load(report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "expert_load.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    png = out_dir / "expert_load.png"
    plot_heatmap(report, png)
    return [json_path, png]


def plot_heatmap(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [torch.tensor(c, dtype=torch.float64) for c in report["token_counts"]]
    labels = [f"layer {layer}" for layer in report["layers"]]
    if report.get("mtp_layer"):
        rows.append(torch.tensor(report["mtp_layer"]["token_counts"], dtype=torch.float64))
        labels.append(f"MTP (layer {report['mtp_layer']['layer']})")
    share = torch.stack([r / r.mean() for r in rows])  # [rows, E]: load relative to the layer's mean
    fig, ax = plt.subplots(figsize=(max(6, share.shape[1] * 0.45), 1 + 0.6 * len(rows)))
    image = ax.imshow(share.numpy(), cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xticks(range(share.shape[1]))
    ax.set_xlabel("routed expert")
    for (i, j), value in _cells(share):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, label="tokens / layer mean")
    ax.set_title("expert load on the test split (max/mean per row: " +
                 ", ".join(f"{float(r.max() / r.mean()):.2f}" for r in rows) + ")", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cells(t: torch.Tensor):
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            yield (i, j), float(t[i, j])
