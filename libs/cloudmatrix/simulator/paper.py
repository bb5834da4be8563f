"""The paper's system-level figures (../shared/PAPERS.md, "Headline tables" and s2) next to the
simulator's predictions. None of these figures sets a constant: they are held out, and the error
of each is what the model is worth.

Each independent observation is scored once: a decode point's TPOT and tokens/s are one
measurement (tokens/s = batch / TPOT), so a point is scored by its TPOT and its tokens/s is shown
beside it; the decode headline (batch 96, ~4K) is the 50 ms / 4096 SLO point; microbatching is
scored as the throughput ratio of two microbatches to one. ``BOUND`` is the acceptance bound of
every bounded observation (the median of the absolute errors is reported beside it).
"""
from __future__ import annotations

import dataclasses

from cloudmatrix.costmodel.ops import DEEPSEEK_V3
from cloudmatrix.simulator.decode import DecodeSetup, experts_per_die, largest_batch_within, simulate_decode
from cloudmatrix.simulator.experts import eplb_imbalance
from cloudmatrix.simulator.prefill import PrefillSetup, simulate_prefill

BOUND = 0.20
UNBOUNDED = frozenset({"context_cache"})  # the paper does not break its reuse path down: reported only


def decode_imbalance(setup: DecodeSetup) -> float:
    """EPLB over the routed-expert dies (EP320 as deployed: one expert per die)."""
    return eplb_imbalance(setup.dies - setup.shared_replicas, setup.redundant, experts_per_die(setup, DEEPSEEK_V3))


def prefill_imbalance(setup: PrefillSetup, eplb: str) -> float:
    if eplb == "perfect":
        return 1.0
    return eplb_imbalance(setup.dies, setup.dies * setup.experts_per_die - 256, setup.experts_per_die)


def decode_setup(batch_per_npu: int, kv_len: int, **changes) -> DecodeSetup:
    """The paper's decode deployment at a batch per NPU, with its EPLB's imbalance."""
    setup = DecodeSetup(batch_per_die=batch_per_npu // 2, kv_len=kv_len, **changes)
    if "imbalance" not in changes:
        setup = dataclasses.replace(setup, imbalance=decode_imbalance(setup))
    return setup


def mean_kv_len(prompt: int, output: int) -> int:
    """A request's mean KV length over its decode (assumption: the batch is at every stage of its
    output, so on average half of it is generated)."""
    return prompt + output // 2


@dataclasses.dataclass(frozen=True)
class Row:
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

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "error": self.error, "bound": self.bound, "within": self.within}


SLO_ROWS = (  # (SLO ms, prompt, output, batch per NPU, TPOT ms, tokens/s per NPU)
    (50, 1024, 1024, 128, 46.8, 2733), (50, 2048, 256, 112, 47.4, 2360), (50, 4096, 256, 96, 49.4, 1943),
    (30, 4096, 256, 24, 24.6, 974), (15, 4096, 256, 8, 14.9, 538))


def prefill_rows() -> list[Row]:
    rows = []
    for eplb, paper in (("default", 5655), ("perfect", 6688)):
        setup = PrefillSetup()
        result = simulate_prefill(dataclasses.replace(setup, imbalance=prefill_imbalance(setup, eplb)))
        rows.append(Row("prefill", f"{eplb} EPLB, 4K prompts, 16,384 tokens/NPU", "tokens/s per NPU", paper,
                        result.tokens_per_s_per_npu))
    return rows


def slo_rows() -> list[Row]:
    """The decode points of the SLO table, each scored by its TPOT (the 50 ms / 4096 point is
    also the paper's decode headline, batch 96 at ~4K)."""
    rows = []
    for slo, prompt, output, batch, tpot, throughput in SLO_ROWS:
        result = simulate_decode(decode_setup(batch, mean_kv_len(prompt, output)))
        label = f"SLO {slo} ms, {prompt}/{output}, batch {batch}"
        shown = {"paper_tokens_per_s_per_npu": throughput, "tokens_per_s_per_npu": result.tokens_per_s_per_npu,
                 "microbatches": result.setup.microbatches}
        rows.append(Row("slo", label, "TPOT ms", tpot, result.tpot_s * 1e3, shown))
    return rows


def microbatch_rows() -> list[Row]:
    """Decode throughput with two microbatches over one (the paper's gains of 5.8, 9.4, 6.9%)."""
    rows = []
    for batch, gain in ((64, 5.8), (96, 9.4), (128, 6.9)):
        one = simulate_decode(decode_setup(batch, 4096, microbatches=1))
        two = simulate_decode(decode_setup(batch, 4096, microbatches=2))
        rows.append(Row("microbatch", f"decode batch {batch}/NPU", "throughput x (2 / 1)", 1 + gain / 100,
                        two.tokens_per_s_per_npu / one.tokens_per_s_per_npu))
    return rows


def mtp_rows() -> list[Row]:
    off, on = (simulate_decode(decode_setup(96, 4096, mtp=m)) for m in (False, True))
    return [Row("mtp", "per-layer latency, MTP off", "us", 874, off.layer_s * 1e6),
            Row("mtp", "per-layer latency, MTP on", "us", 1260, on.layer_s * 1e6)]


def context_cache_rows() -> list[Row]:
    base = simulate_prefill(PrefillSetup())
    rows = []
    for reuse, gain in ((0.5, 1.42), (0.9, 2.28)):
        cached = simulate_prefill(PrefillSetup(reuse=reuse))
        rows.append(Row("context_cache", f"{reuse:.0%} of each prompt reused", "prefill throughput x", gain,
                        cached.tokens_per_s_per_npu / base.tokens_per_s_per_npu))
    return rows


def paper_rows() -> list[Row]:
    return prefill_rows() + slo_rows() + microbatch_rows() + mtp_rows() + context_cache_rows()


def median_abs_error(rows: list[Row]) -> float:
    """Median of the bounded observations' absolute errors."""
    errors = sorted(abs(r.error) for r in rows if r.bound is not None)
    mid = len(errors) // 2
    return errors[mid] if len(errors) % 2 else (errors[mid - 1] + errors[mid]) / 2


def slo_batches() -> list[dict]:
    """For each SLO row: the largest batch the model finds within the SLO, next to the paper's."""
    out = []
    for slo, prompt, output, batch, _, _ in SLO_ROWS:
        best = largest_batch_within(slo / 1e3, decode_setup(4, mean_kv_len(prompt, output)))
        out.append({"slo_ms": slo, "prompt": prompt, "output": output, "paper_batch_per_npu": batch,
                    "predicted_batch_per_npu": 2 * best.setup.batch_per_die if best else 0,
                    "predicted_tpot_ms": best.tpot_s * 1e3 if best else None,
                    "predicted_microbatches": best.setup.microbatches if best else None,
                    "predicted_tokens_per_s_per_npu": best.tokens_per_s_per_npu if best else 0.0})
    return out
