"""Metrics and output of the PASA study: error metrics, stdout tables, JSON, PNG heatmaps."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

FP16_MODES = ("fp16-naive", "pasa", "pasa-hybrid")


def error_metrics(out: torch.Tensor, ref: torch.Tensor, v: torch.Tensor) -> dict:
    """Non-finite count and RMSE against the fp64 reference (NaN once any output is inf/NaN)."""
    nonfinite = int((~torch.isfinite(out)).sum())
    rmse = (out.double() - ref).pow(2).mean().sqrt().item()
    return {
        "nonfinite": nonfinite,
        "nonfinite_frac": nonfinite / out.numel(),
        "rmse": rmse,
        "rmse_rel_v": rmse / _rms(v),
        "rmse_rel_o": rmse / _rms(ref),
    }


def _rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def format_table(study: dict) -> str:
    """One line per case and mode."""
    lines = [f"{'case':<30} {'mode':<12} {'inf/NaN':>9} {'RMSE':>10} {'RMSE/RMS(V)':>12} {'RMSE/RMS(O)':>12}"]
    for case in study["cases"]:
        for mode, r in case["results"].items():
            lines.append(f"{case['name']:<30} {mode:<12} {r['nonfinite']:>9d} {_num(r['rmse']):>10} "
                         f"{_num(r['rmse_rel_v']):>12} {_num(r['rmse_rel_o']):>12}")
    return "\n".join(lines)


def format_summary(study: dict) -> str:
    """Markdown: one row per case; per fp16 mode the inf/NaN count and RMSE/RMS(O_ref)."""
    head = "| case | " + " | ".join(f"{m} inf/NaN | {m} RMSE/RMS(O)" for m in FP16_MODES) + " | fp64 PASA RMSE/RMS(O) |"
    rows = [head, "|" + "---|" * (2 + 2 * len(FP16_MODES))]
    for case in study["cases"]:
        res = case["results"]
        cells = [f"{res[m]['nonfinite']} | {_num(res[m]['rmse_rel_o'])}" for m in FP16_MODES]
        exact = _num(res["fp64"]["rmse_rel_o"]) if "fp64" in res else "-"
        rows.append(f"| {case['name']} | " + " | ".join(cells) + f" | {exact} |")
    return "\n".join(rows)


def _num(x: float | None) -> str:
    return "inf/NaN" if x is None or not math.isfinite(x) else f"{x:.3e}"


def write_json(study: dict, path: Path) -> None:
    path.write_text(json.dumps(_finite_or_null(study), indent=2) + "\n")


def _finite_or_null(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_null(v) for v in x]
    return x


def write_heatmaps(study: dict, path: Path) -> None:
    """Per grid distribution: inf/NaN fraction and log10 RMSE/RMS(O_ref) over mean x Am, per fp16 mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = [d for d in ("uniform", "hybrid") if any(c["distribution"] == d for c in study["cases"])]
    fig, axes = plt.subplots(2 * len(grids), len(FP16_MODES), figsize=(4.2 * len(FP16_MODES), 3.4 * 2 * len(grids)),
                             squeeze=False)
    for g, dist in enumerate(grids):
        cases = [c for c in study["cases"] if c["distribution"] == dist]
        means = sorted({c["mean"] for c in cases})
        amps = sorted({c["amplitude"] for c in cases})
        for col, mode in enumerate(FP16_MODES):
            overflow, error = _grid(cases, means, amps, mode)
            _panel(axes[2 * g][col], overflow, means, amps, f"{dist} {mode}: inf/NaN fraction", "Reds", 0.0, 1.0)
            _panel(axes[2 * g + 1][col], error, means, amps, f"{dist} {mode}: log10 RMSE/RMS(O)", "viridis", -4.5, -0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _grid(cases: list[dict], means: list[float], amps: list[float], mode: str):
    overflow = [[math.nan] * len(amps) for _ in means]
    error = [[math.nan] * len(amps) for _ in means]
    for c in cases:
        i, j = means.index(c["mean"]), amps.index(c["amplitude"])
        r = c["results"][mode]
        overflow[i][j] = r["nonfinite_frac"]
        rel = r["rmse_rel_o"]
        error[i][j] = math.log10(rel) if rel is not None and math.isfinite(rel) and rel > 0 else math.nan
    return overflow, error


def _panel(ax, values, means, amps, title, cmap_name, vmin, vmax) -> None:
    import matplotlib

    cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="lightgrey")  # inf/NaN output: no error to show
    ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
    ax.set_xticks(range(len(amps)), [f"{a:g}" for a in amps])
    ax.set_yticks(range(len(means)), [f"{m:g}" for m in means])
    ax.set_xlabel("amplitude Am")
    ax.set_ylabel("mean")
    ax.set_title(title, fontsize=9)
    for i, row in enumerate(values):
        for j, val in enumerate(row):
            ax.text(j, i, "inf/NaN" if math.isnan(val) else f"{val:.2g}", ha="center", va="center", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
