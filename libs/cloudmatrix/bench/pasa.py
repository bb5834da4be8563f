"""`cmx bench pasa`: overflow and accuracy of fp16 flash attention with and without PASA.

The paper's random benchmark (28 Q heads, 4 KV heads, S = 1407, D = 128; uniform and hybrid
distributions over mean x amplitude, plus resonance): every fp16 mode and the fp64 PASA run are
compared with the fp64 softmax reference. Writes pasa_study.json and pasa_study.png to --out.
Measured wall time on this machine only; this study models no NPU time.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from cloudmatrix.bench.pasa_cases import (
    FULL_SHAPE,
    QUICK_SHAPE,
    RESONANCE,
    SPIKE_PROBABILITY,
    StudyCase,
    StudyShape,
    full_cases,
    make_qkv,
    quick_cases,
)
from cloudmatrix.bench.pasa_report import (
    error_metrics,
    format_summary,
    format_table,
    write_heatmaps,
    write_json,
)
from cloudmatrix.kernels.pasa import DEFAULT_BETA, attention_reference, flash_attention

MODES = ("fp16-naive", "pasa", "pasa-hybrid", "fp64")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    shape: StudyShape
    cases: tuple[StudyCase, ...]
    quick: bool
    seed: int = 0
    beta: float = DEFAULT_BETA
    tile: int = 128


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("pasa", help="PASA vs naive fp16 flash attention: overflow and error study")
    parser.add_argument("--quick", action="store_true", help="reduced grid and shapes (seconds)")
    parser.add_argument("--out", default="runs/bench/pasa", help="directory for pasa_study.json / .png")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA, help="PASA shift strength, in (0, 1)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    shape, cases = (QUICK_SHAPE, quick_cases()) if args.quick else (FULL_SHAPE, full_cases())
    if not 0.0 < args.beta < 1.0:
        raise ValueError(f"--beta must lie in (0, 1), got {args.beta}")
    study = run_study(StudyConfig(shape, tuple(cases), quick=args.quick, seed=args.seed, beta=args.beta))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(study, out / "pasa_study.json")
    write_heatmaps(study, out / "pasa_study.png")
    print(format_table(study))
    print()
    print(format_summary(study))
    print(f"\nwrote {out / 'pasa_study.json'} and {out / 'pasa_study.png'} ({study['wall_s']:.1f} s measured)")
    return 0


def run_study(config: StudyConfig) -> dict:
    """Runs every case in every mode; returns the JSON-ready study record."""
    start = time.perf_counter()
    cases = [_run_case(case, config, config.seed + i) for i, case in enumerate(config.cases)]
    return {
        "benchmark": "pasa",
        "quick": config.quick,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": _params(config),
        "cases": cases,
        "wall_s": time.perf_counter() - start,
    }


def _run_case(case: StudyCase, config: StudyConfig, seed: int) -> dict:
    q, k, v = make_qkv(case, config.shape, seed)
    scale = config.shape.head_dim ** -0.5
    ref = attention_reference(q, k, v, scale=scale)
    results = {}
    for mode in MODES:
        start = time.perf_counter()
        out = flash_attention(q, k, v, scale=scale, mode=mode, beta=config.beta,
                              tile_q=config.tile, tile_kv=config.tile)
        results[mode] = error_metrics(out, ref, v) | {"wall_s": time.perf_counter() - start}
    return {"name": case.name, "distribution": case.distribution, "mean": case.mean,
            "amplitude": case.amplitude, "phase": case.phase, "seed": seed,
            "rms_v": v.double().pow(2).mean().sqrt().item(), "rms_o_ref": ref.pow(2).mean().sqrt().item(),
            "results": results}


def _params(config: StudyConfig) -> dict:
    return {
        **dataclasses.asdict(config.shape),
        "scale": config.shape.head_dim ** -0.5,
        "beta": config.beta,
        "tile_q": config.tile,
        "tile_kv": config.tile,
        "seed": config.seed,
        "causal": False,
        "modes": list(MODES),
        "reference": "attention_reference: softmax attention in float64",
        "generation": "q, k and v all drawn from the case distribution; case i uses seed + i",
        "uniform": "(U - 0.5) * 2 * Am + mean",
        "hybrid": f"N(mean, 1) + N(0, Am) * Bernoulli({SPIKE_PROBABILITY})",
        "resonance": {**RESONANCE, "q": "bias + A cos(2 pi cycles d / D) + U noise",
                      "k": "bias +- A cos(2 pi cycles d / D) + U noise", "v": "bias + U noise"},
    }
