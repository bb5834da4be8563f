"""Side-by-side timing: candidates run interleaved, so machine noise hits all of them alike."""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calling them round-robin ``repeats`` times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def apply_quick(args, quick: dict) -> None:
    """``--quick``: replace the arguments ``quick`` names with its smaller values."""
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)


def write_report(out_dir: str | Path, name: str, report: dict) -> Path:
    """Write ``<out_dir>/<name>.json`` with the thread count recorded; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"threads": torch.get_num_threads(), **report}
    path = out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
