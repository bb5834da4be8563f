"""The paper's system-level figures (../shared/PAPERS.md, "Headline tables" and s2) next to the
simulator's predictions under a calibration (simulator/calibration.py).

Each independent observation is scored once, under a stable key: a decode point's TPOT and
tokens/s are one measurement (tokens/s = batch / TPOT), so a point is scored by its TPOT and its
tokens/s is shown beside it; the decode headline (batch 96, ~4K) is the 50 ms / 4096 SLO point;
microbatching is scored as the throughput ratio of two microbatches to one. Every observation is
either in the calibration's declared training subset or held out (``Row.split``); ``BOUND`` is the
acceptance bound of every bounded observation.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from cloudmatrix.simulator.calibration import FITTED, TRAINING, Calibration
from cloudmatrix.simulator.decode import DecodeResult, DecodeSetup, largest_batch_within, simulate_decode
from cloudmatrix.simulator.prefill import PrefillResult, PrefillSetup, simulate_prefill

BOUND = 0.20
UNBOUNDED = frozenset({"context_cache"})  # the paper does not break its reuse path down: reported only
BATCH_GRID = 8  # batch sizes tried per NPU in the SLO search: multiples of 8, as all of the paper's are


def decode_setup(batch_per_npu: int, kv_len: int, cal: Calibration = FITTED, **changes) -> DecodeSetup:
    """The paper's decode deployment at a batch per NPU: default EPLB's residual and the dispatch
    slowdown on the core partition as calibrated (``changes`` override)."""
    calibrated = {"imbalance": cal.eplb_residual, "round_slowdown": cal.round_slowdown}
    return DecodeSetup(batch_per_die=batch_per_npu // 2, kv_len=kv_len, **(calibrated | changes))


def decode(setup: DecodeSetup, cal: Calibration = FITTED) -> DecodeResult:
    return simulate_decode(setup, eff=cal.efficiency())


def prefill(setup: PrefillSetup, cal: Calibration = FITTED) -> PrefillResult:
    return simulate_prefill(setup, eff=cal.efficiency())


def mean_kv_len(prompt: int, output: int) -> int:
    """A request's mean KV length over its decode (assumption: the batch is at every stage of its
    output, so on average half of it is generated)."""
    return prompt + output // 2


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    table: str
    label: str
    metric: str
    paper: float
    predicted: float
    shown: dict = dataclasses.field(default_factory=dict)  # derived figures shown beside it, not scored

    @property
    def error(self) -> float:
        return self.predicted / self.paper - 1.0

    @property
    def bound(self) -> float | None:
        return None if self.table in UNBOUNDED else BOUND

    @property
    def within(self) -> bool | None:
        return None if self.bound is None else abs(self.error) <= self.bound

    @property
    def split(self) -> str:
        """"train" (the calibration saw it), "held out", or "reported" (no bound: not scored)."""
        return "train" if self.key in TRAINING else "held out" if self.bound is not None else "reported"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "error": self.error, "bound": self.bound, "within": self.within,
                "split": self.split}


SLO_ROWS = (  # (SLO ms, prompt, output, batch per NPU, TPOT ms, tokens/s per NPU)
    (50, 1024, 1024, 128, 46.8, 2733), (50, 2048, 256, 112, 47.4, 2360), (50, 4096, 256, 96, 49.4, 1943),
    (30, 4096, 256, 24, 24.6, 974), (15, 4096, 256, 8, 14.9, 538))


def _prefill_row(eplb: str, paper: float) -> Callable[[Calibration], Row]:
    def row(cal: Calibration) -> Row:
        result = prefill(PrefillSetup(imbalance=cal.eplb_residual if eplb == "default" else 1.0), cal)
        return Row(f"prefill_{eplb}", "prefill", f"{eplb} EPLB, 4K prompts, 16,384 tokens/NPU", "tokens/s per NPU",
                   paper, result.tokens_per_s_per_npu)
    return row


def _slo_row(slo: int, prompt: int, output: int, batch: int, tpot: float, throughput: float):
    def row(cal: Calibration) -> Row:
        result = decode(decode_setup(batch, mean_kv_len(prompt, output), cal), cal)
        shown = {"paper_tokens_per_s_per_npu": throughput, "tokens_per_s_per_npu": result.tokens_per_s_per_npu,
                 "microbatches": result.setup.microbatches}
        return Row(f"slo_{slo}ms_{prompt}", "slo", f"SLO {slo} ms, {prompt}/{output}, batch {batch}", "TPOT ms",
                   tpot, result.tpot_s * 1e3, shown)
    return row


def _microbatch_row(batch: int, gain: float) -> Callable[[Calibration], Row]:
    """Decode throughput with two microbatches over one (the paper's gains of 5.8, 9.4, 6.9%)."""
    def row(cal: Calibration) -> Row:
        one, two = (decode(decode_setup(batch, 4096, cal, microbatches=m), cal) for m in (1, 2))
        return Row(f"microbatch_{batch}", "microbatch", f"decode batch {batch}/NPU", "throughput x (2 / 1)",
                   1 + gain / 100, two.tokens_per_s_per_npu / one.tokens_per_s_per_npu)
    return row


def _mtp_row(mtp: bool, paper: float) -> Callable[[Calibration], Row]:
    def row(cal: Calibration) -> Row:
        result = decode(decode_setup(96, 4096, cal, mtp=mtp), cal)
        name = "on" if mtp else "off"
        return Row(f"mtp_{name}_layer", "mtp", f"per-layer latency, MTP {name}", "us", paper, result.layer_s * 1e6)
    return row


def _context_cache_row(reuse: float, gain: float) -> Callable[[Calibration], Row]:
    def row(cal: Calibration) -> Row:
        base, cached = (prefill(PrefillSetup(reuse=r, imbalance=cal.eplb_residual), cal) for r in (0.0, reuse))
        return Row(f"context_cache_{round(reuse * 100)}", "context_cache", f"{reuse:.0%} of each prompt reused",
                   "prefill throughput x", gain, cached.tokens_per_s_per_npu / base.tokens_per_s_per_npu)
    return row


OBSERVATIONS: dict[str, Callable[[Calibration], Row]] = {
    "prefill_default": _prefill_row("default", 5655), "prefill_perfect": _prefill_row("perfect", 6688),
    **{f"slo_{r[0]}ms_{r[1]}": _slo_row(*r) for r in SLO_ROWS},
    **{f"microbatch_{b}": _microbatch_row(b, g) for b, g in ((64, 5.8), (96, 9.4), (128, 6.9))},
    "mtp_off_layer": _mtp_row(False, 874), "mtp_on_layer": _mtp_row(True, 1260),
    "context_cache_50": _context_cache_row(0.5, 1.42), "context_cache_90": _context_cache_row(0.9, 2.28),
}
assert set(TRAINING) <= set(OBSERVATIONS), "the training subset names observations that do not exist"


def paper_rows(cal: Calibration = FITTED, keys=None) -> list[Row]:
    """Every observation (or those of ``keys``), predicted under ``cal``."""
    return [OBSERVATIONS[k](cal) for k in (keys or OBSERVATIONS)]


def median_abs_error(rows: list[Row]) -> float:
    """Median of the bounded observations' absolute errors."""
    errors = sorted(abs(r.error) for r in rows if r.bound is not None)
    if not errors:
        return 0.0
    mid = len(errors) // 2
    return errors[mid] if len(errors) % 2 else (errors[mid - 1] + errors[mid]) / 2


def slo_batches(cal: Calibration = FITTED) -> list[dict]:
    """For each SLO row: the largest batch per NPU, of the sizes tried (multiples of ``BATCH_GRID``),
    whose TPOT meets the SLO, next to the paper's; "matches" when it is the paper's batch or the
    next size tried."""
    out = []
    for slo, prompt, output, batch, _, _ in SLO_ROWS:
        best = largest_batch_within(slo / 1e3, decode_setup(BATCH_GRID, mean_kv_len(prompt, output), cal),
                                    step=BATCH_GRID // 2, eff=cal.efficiency())
        found = 2 * best.setup.batch_per_die if best else 0
        out.append({"slo_ms": slo, "prompt": prompt, "output": output, "paper_batch_per_npu": batch,
                    "predicted_batch_per_npu": found, "matches": found in (batch, batch + BATCH_GRID),
                    "predicted_tpot_ms": best.tpot_s * 1e3 if best else None,
                    "predicted_microbatches": best.setup.microbatches if best else None,
                    "predicted_tokens_per_s_per_npu": best.tokens_per_s_per_npu if best else 0.0})
    return out
