"""PNG plots of a `cmx bench serve` run: TTFT and TPOT CDFs per run, and output throughput vs
median TPOT across a concurrency sweep."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from cloudmatrix.bench.serve.client import RequestResult  # noqa: E402


def cdf_plot(runs: dict[str, list[RequestResult]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, results in runs.items():
        ok = [r for r in results if r.ok]
        for ax, values in ((axes[0], [r.ttft_s for r in ok]), (axes[1], [r.tpot_s for r in ok if r.output_tokens > 1])):
            xs = sorted(v * 1e3 for v in values)
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    for ax, name in zip(axes, ("TTFT", "TPOT")):
        ax.set_xlabel(f"{name} (ms, measured here)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("cmx bench serve: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_plot(points: list[tuple[str, float, float]], path: Path) -> Path:
    """points: (label, median TPOT ms, output tok/s)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p[1] for p in points], [p[2] for p in points], marker="o")
    for label, tpot, tput in points:
        ax.annotate(label, (tpot, tput), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("TPOT p50 (ms)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("throughput vs TPOT across concurrency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cpu_split_plot(bars: dict[str, dict[str, float]], path: Path) -> Path:
    """bars: system or run -> {process kind: CPU-ms per output token}; one stacked bar each."""
    kinds = list(dict.fromkeys(k for split in bars.values() for k in split))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 2.2))
    names = list(bars)
    left = [0.0] * len(names)
    for kind in kinds:
        widths = [bars[n].get(kind, 0.0) for n in names]
        ax.barh(names, widths, left=left, label=kind)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("CPU-ms per output token (all threads, user + system)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4)
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Where the CPU goes, by process kind")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
