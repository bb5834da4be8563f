"""The simulator's calibration, pre-registered: four named physical constants that no operator
figure gives, each bounded by public facts, fitted (simulator/validation.py) only on the declared
``TRAINING`` subset of the paper's observations; every other observation is held out.

Everything else in the model is an operator-level figure (costmodel/) or a documented structural
assumption (docs/simulator.md). ``FITTED`` holds the fit's result; `cmx simulate --validate`
refits from ``PRIOR`` and tests/test_simulator.py checks that it lands on ``FITTED``.
"""
from __future__ import annotations

import dataclasses

from cloudmatrix.costmodel.die import PAPER_EFFICIENCY, DieEfficiency


@dataclasses.dataclass(frozen=True)
class Constant:
    name: str
    low: float
    high: float
    prior: float                     # before the fit: the operator-level figure or the old assumption
    unit: str
    meaning: str
    bounds: str                      # the public facts behind low and high

    def normalized(self, value: float) -> float:
        return (value - self.low) / (self.high - self.low)


CONSTANTS = (
    Constant("mla_efficiency", 0.364, 0.654, 0.654, "of peak",
             "the MLA core's sustained share of the die's BF16 peak inside a serving step (decode and prefill)",
             "high: the paper's MLA operator benchmark, 65.4% (FlashMLA alone reaches 660 of 990 TFLOPS, 67%, "
             "on the H800); low: the paper's '~600 us per path' (batch 96, 4K, MTP) holds a microbatch's whole "
             "attention path, 24 sequences per die on 16 of 24 cube cores; its MLA core alone (54.8 GFLOP) "
             "fills that at 36.4%"),
    Constant("round_slowdown", 1.0, 3.0, 1.0, "x",
             "dispatch and combine on the MoE path's 16 of 48 vector cores (two microbatches) over the same "
             "round on the whole die",
             "low: rounds bound by the UB link alone; high: bound by the vector cores, 48 / 16 (the paper's "
             "decode core split)"),
    Constant("eplb_residual", 1.0, 1.23, 1.0, "x",
             "the busiest expert die's expected load over the mean after the default EPLB (decode and prefill)",
             "low: perfect placement; high: the trained router's hottest expert over the mean before any "
             "placement, 1.12-1.23 (models/cmx-tiny-py/expert_load.json; EPLB can only lower it)"),
    Constant("launch_s", 0.0, 10e-6, 2e-6, "s",
             "per-operator launch cost of a step run as a captured graph",
             "low: none; high: an eager kernel launch, ~10 us; prior: device-side task dispatch, a few us"),
)
BY_NAME = {c.name: c for c in CONSTANTS}

# Declared before fitting: one observation per constant, each the most direct view of it. The
# MTP-off layer latency (batch 96, 4K) is mostly the MLA core; the microbatch gain at batch 96 is
# the overlap of the two paths, set by the rounds on the partition; the 15 ms SLO point (batch 8)
# is where fixed per-operator costs weigh most; the prefill with default EPLB adds the placement's
# residual to a batch whose compute the perfect-EPLB row (held out) checks.
TRAINING = ("mtp_off_layer", "microbatch_96", "slo_15ms_4096", "prefill_default")


@dataclasses.dataclass(frozen=True)
class Calibration:
    mla_efficiency: float
    round_slowdown: float
    eplb_residual: float
    launch_s: float

    def __post_init__(self) -> None:
        for c in CONSTANTS:
            value = getattr(self, c.name)
            if not c.low - 1e-12 <= value <= c.high + 1e-12:
                raise ValueError(f"{c.name}: {value!r} is outside its bounds [{c.low}, {c.high}]")

    def efficiency(self) -> DieEfficiency:
        """The operator efficiencies with the calibrated MLA efficiency and launch cost."""
        return dataclasses.replace(PAPER_EFFICIENCY, mla_compute=self.mla_efficiency, launch_s=self.launch_s)

    def values(self) -> dict[str, float]:
        return dataclasses.asdict(self)


PRIOR = Calibration(**{c.name: c.prior for c in CONSTANTS})
# `cmx simulate --validate` (validation.fit() from PRIOR on TRAINING), rounded: the round-trip is
# a test. Two constants end at a bound: the training rows want the rounds no slower on the
# partition, and more placement residual than the trained router's skew allows.
FITTED = Calibration(mla_efficiency=0.394, round_slowdown=1.0, eplb_residual=1.23, launch_s=4.24e-6)
