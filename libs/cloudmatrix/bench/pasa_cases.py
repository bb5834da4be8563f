"""Input cases of the PASA accuracy study: the paper's random distributions plus a resonance case.

Q, K and V are all drawn from the case's distribution, as in the paper's reference script:
  uniform    (U - 0.5) * 2 * Am + mean
  hybrid     N(mean, 1) + N(0, Am) * Bernoulli(0.001)   (rare large spikes, as in FlashAttention-3)
  resonance  Q = bias + A cos(2 pi c d / D) + noise,  K = bias +- A cos(2 pi c d / D) + noise,
             V = bias + noise: every token of Q and K carries the same head-dimension pattern, in phase
             (+) or in anti-phase (-), so Q.K grows like D (not sqrt(D)) on top of the bias.
Shape legend: B = batch, H = heads, S = sequence length, D = head dim.
"""
from __future__ import annotations

import dataclasses
import math

import torch

MEANS = (0.0, 10.0, 20.0, 30.0)
AMPLITUDES = (0.5, 5.0, 10.0, 20.0)
SPIKE_PROBABILITY = 0.001
RESONANCE = {"bias": 10.0, "amplitude": 40.0, "cycles": 4, "noise": 0.5}


@dataclasses.dataclass(frozen=True)
class StudyCase:
    distribution: str  # "uniform" | "hybrid" | "resonance"
    mean: float  # the bias for resonance
    amplitude: float
    phase: str = ""  # "in-phase" | "anti-phase" for resonance

    @property
    def name(self) -> str:
        if self.distribution == "resonance":
            return f"resonance {self.phase}"
        return f"{self.distribution} mean={self.mean:g} Am={self.amplitude:g}"


@dataclasses.dataclass(frozen=True)
class StudyShape:
    batch: int
    q_heads: int
    kv_heads: int
    seq_len: int
    head_dim: int


FULL_SHAPE = StudyShape(batch=1, q_heads=28, kv_heads=4, seq_len=1407, head_dim=128)
QUICK_SHAPE = StudyShape(batch=1, q_heads=4, kv_heads=2, seq_len=200, head_dim=128)


def full_cases() -> list[StudyCase]:
    grid = [(m, a) for m in MEANS for a in AMPLITUDES]
    return ([StudyCase("uniform", m, a) for m, a in grid] + [StudyCase("hybrid", m, a) for m, a in grid]
            + _resonance_cases())


def quick_cases() -> list[StudyCase]:
    uniform = [StudyCase("uniform", m, a) for m, a in ((0.0, 0.5), (0.0, 20.0), (30.0, 0.5), (30.0, 20.0))]
    return uniform + [StudyCase("hybrid", 30.0, 10.0), _resonance_cases()[0]]


def _resonance_cases() -> list[StudyCase]:
    r = RESONANCE
    return [StudyCase("resonance", r["bias"], r["amplitude"], phase) for phase in ("in-phase", "anti-phase")]


def make_qkv(case: StudyCase, shape: StudyShape, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q: [B, Hq, S, D], k, v: [B, Hkv, S, D], float32, from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    b, s, d = shape.batch, shape.seq_len, shape.head_dim
    sizes = ((b, shape.q_heads, s, d), (b, shape.kv_heads, s, d), (b, shape.kv_heads, s, d))
    if case.distribution == "uniform":
        return tuple(_uniform(gen, size, case.mean, case.amplitude) for size in sizes)
    if case.distribution == "hybrid":
        return tuple(_hybrid(gen, size, case.mean, case.amplitude) for size in sizes)
    if case.distribution == "resonance":
        return _resonance(gen, sizes, case.phase)
    raise ValueError(f"unknown distribution {case.distribution!r}")


def _uniform(gen: torch.Generator, size: tuple[int, ...], mean: float, amplitude: float) -> torch.Tensor:
    return (torch.rand(size, generator=gen) - 0.5) * 2.0 * amplitude + mean


def _hybrid(gen: torch.Generator, size: tuple[int, ...], mean: float, amplitude: float) -> torch.Tensor:
    base = torch.randn(size, generator=gen) + mean
    spikes = torch.randn(size, generator=gen) * amplitude
    return base + spikes * torch.bernoulli(torch.full(size, SPIKE_PROBABILITY), generator=gen)


def _resonance(gen: torch.Generator, sizes, phase: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = RESONANCE
    d = sizes[0][-1]
    pattern = r["amplitude"] * torch.cos(2.0 * math.pi * r["cycles"] * torch.arange(d) / d)  # [D]
    sign = 1.0 if phase == "in-phase" else -1.0
    q = _uniform(gen, sizes[0], r["bias"], r["noise"]) + pattern
    k = _uniform(gen, sizes[1], r["bias"], r["noise"]) + sign * pattern
    return q, k, _uniform(gen, sizes[2], r["bias"], r["noise"])
