"""Fitting the calibration (simulator/calibration.py) on its training subset, and what a reviewer
asks of it: training and held-out errors, leave-one-out errors, the fitted constants' ranges,
uncertainty bands on every prediction, and which constant moves which row.

The fit minimizes the training observations' squared log errors, plus a small pull toward the
prior (so a constant that no training observation constrains stays at its prior), by coordinate
descent within the bounds. Every prediction is a pure function of the constants.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

from cloudmatrix.simulator.calibration import CONSTANTS, FITTED, PRIOR, TRAINING, Calibration
from cloudmatrix.simulator.paper import Row, median_abs_error, paper_rows, slo_batches

PRIOR_WEIGHT = 1e-3      # pull toward the prior, per constant, in units of its bounds' width squared
SWEEPS = 4               # coordinate-descent passes over the constants
SECTIONS = 24            # golden-section steps per constant per pass (the bracket shrinks 0.618^24)
_GOLDEN = (math.sqrt(5) - 1) / 2


def loss(cal: Calibration, keys: tuple[str, ...]) -> float:
    fit = sum(math.log(r.predicted / r.paper) ** 2 for r in paper_rows(cal, keys))
    pull = sum((c.normalized(getattr(cal, c.name)) - c.normalized(c.prior)) ** 2 for c in CONSTANTS)
    return fit + PRIOR_WEIGHT * pull


def fit(keys: tuple[str, ...] = TRAINING, start: Calibration = PRIOR) -> Calibration:
    """The constants that best predict the observations ``keys``, within their bounds."""
    cal = start
    for _ in range(SWEEPS):
        for c in CONSTANTS:
            cal = _best_along(cal, c, keys)
    return cal


def _best_along(cal: Calibration, c, keys: tuple[str, ...]) -> Calibration:
    """Golden-section search of one constant over its bounds, the others fixed (and the current
    value kept if nothing better is found)."""
    def at(v: float) -> Calibration:
        return dataclasses.replace(cal, **{c.name: v})

    a, b = c.low, c.high
    x1, x2 = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    f1, f2 = loss(at(x1), keys), loss(at(x2), keys)
    for _ in range(SECTIONS):
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - _GOLDEN * (b - a)
            f1 = loss(at(x1), keys)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + _GOLDEN * (b - a)
            f2 = loss(at(x2), keys)
    best = at(x1 if f1 <= f2 else x2)
    return best if loss(best, keys) <= loss(cal, keys) else cal


def leave_one_out(cal: Calibration = FITTED) -> dict[str, dict]:
    """For each training observation: the constants fitted on the others, and its error then."""
    out = {}
    for key in TRAINING:
        others = tuple(k for k in TRAINING if k != key)
        refit = fit(others, start=cal)
        out[key] = {"error": paper_rows(refit, (key,))[0].error, "constants": refit.values()}
    return out


def ranges(cal: Calibration, loo: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Each constant's range: the fitted value and its leave-one-out refits."""
    return {c.name: (min([getattr(cal, c.name)] + [v["constants"][c.name] for v in loo.values()]),
                     max([getattr(cal, c.name)] + [v["constants"][c.name] for v in loo.values()]))
            for c in CONSTANTS}


def bands(spans: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Each observation's prediction, low and high, over every corner of the constants' ranges."""
    corners = [Calibration(**dict(zip(spans, values))) for values in itertools.product(*spans.values())]
    predicted: dict[str, list[float]] = {}
    for corner in corners:
        for r in paper_rows(corner):
            predicted.setdefault(r.key, []).append(r.predicted)
    return {k: (min(v), max(v)) for k, v in predicted.items()}


def sensitivity(cal: Calibration = FITTED) -> dict[str, dict[str, tuple[float, float]]]:
    """For each constant, each observation's change (relative to ``cal``'s prediction) with that
    constant at its lower and at its upper bound, the others as in ``cal``."""
    base = {r.key: r.predicted for r in paper_rows(cal)}
    out = {}
    for c in CONSTANTS:
        low, high = (paper_rows(dataclasses.replace(cal, **{c.name: v})) for v in (c.low, c.high))
        out[c.name] = {a.key: (a.predicted / base[a.key] - 1.0, b.predicted / base[b.key] - 1.0)
                       for a, b in zip(low, high)}
    return out


def split_errors(rows: list[Row]) -> dict[str, float]:
    train = [r for r in rows if r.split == "train"]
    held = [r for r in rows if r.split == "held out"]
    return {"train_median_abs_error": median_abs_error(train), "held_out_median_abs_error": median_abs_error(held),
            "held_out_max_abs_error": max(abs(r.error) for r in held),
            "held_out_within": sum(bool(r.within) for r in held), "held_out": len(held)}


def validate(cal: Calibration = FITTED) -> dict:
    """The whole report `cmx simulate --validate` prints: the pre-registration, the refit from
    the prior (which should land on ``cal``), every observation with its split and band, the
    leave-one-out errors, the constants' ranges, and the SLO batch search."""
    refit = fit()
    loo = leave_one_out(cal)
    spans = ranges(cal, loo)
    band = bands(spans)
    rows = paper_rows(cal)
    return {"constants": [dataclasses.asdict(c) | {"fitted": getattr(cal, c.name), "range": spans[c.name]}
                          for c in CONSTANTS],
            "training": list(TRAINING), "refit_from_prior": refit.values(),
            "rows": [r.as_dict() | {"band": band[r.key]} for r in rows],
            "leave_one_out": loo, "errors": split_errors(rows), "slo_batches": slo_batches(cal)}
