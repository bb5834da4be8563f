"""Summaries of a run: percentiles (mean, p50, p90, p99) of TTFT, TPOT, ITL and end-to-end
latency; request and output-token throughput; goodput under TTFT / TPOT SLOs; the gateway's
prefix-cache counters read from its Prometheus metrics."""
from __future__ import annotations

import re
import urllib.request

from cloudmatrix.bench.serve.client import RequestResult
from cloudmatrix.instance.metrics import SPEC_SERIES, scrape, speculation
from cloudmatrix.percentiles import PERCENTILES, distribution, percentile  # noqa: F401 (re-exported)


def summarize(results: list[RequestResult], elapsed_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft_s <= slo_ttft_s and r.tpot_s <= slo_tpot_s]
    output = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": elapsed_s,
        "input_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": output,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "request_throughput": len(ok) / elapsed_s if elapsed_s else 0.0,
        "output_throughput": output / elapsed_s if elapsed_s else 0.0,
        "goodput": {"slo_ttft_ms": slo_ttft_s * 1e3, "slo_tpot_ms": slo_tpot_s * 1e3, "requests": len(good),
                    "request_throughput": len(good) / elapsed_s if elapsed_s else 0.0},
        "ttft": distribution([r.ttft_s for r in ok]),
        "tpot": distribution([r.tpot_s for r in ok if r.output_tokens > 1]),
        "itl": distribution([t for r in ok for t in r.itl_s]),
        "e2e": distribution([r.e2e_s for r in ok]),
    }


def scrape_by_label(url: str, name: str, label: str) -> dict[str, float]:
    """Series ``name`` at ``url``/metrics summed per value of ``label``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(rf'^{re.escape(name)}{{([^}}]*)}} (\S+)$', text, re.M):
        value = re.search(rf'{label}="([^"]*)"', m.group(1))
        if value:
            out[value.group(1)] = out.get(value.group(1), 0.0) + float(m.group(2))
    return out


STEP_SERIES = ("cmx_engine_step_seconds_sum", "cmx_engine_step_seconds_count", "cmx_engine_step_sequences_total")
PHASE_SERIES = "cmx_engine_die_phase_seconds_total"


def step_snapshot(url: str) -> dict:
    return {**scrape(url, STEP_SERIES + SPEC_SERIES), "phases": scrape_by_label(url, PHASE_SERIES, "phase")}


def step_breakdown(before: dict, after: dict) -> dict:
    """Where a decode step's time went between two snapshots: mean step wall time, sequences per
    step, and the dies' Forward phases per step (mean over dies; microbatches add up)."""
    steps = after[STEP_SERIES[1]] - before[STEP_SERIES[1]]
    if not steps:
        return {"steps": 0}
    per_step = {k: (v - before["phases"].get(k, 0.0)) / steps * 1e3 for k, v in after["phases"].items()}
    drafts, accepted = (after.get(k, 0.0) - before.get(k, 0.0) for k in SPEC_SERIES)
    out = {"steps": int(steps), "step_ms": (after[STEP_SERIES[0]] - before[STEP_SERIES[0]]) / steps * 1e3,
           "sequences_per_step": (after[STEP_SERIES[2]] - before[STEP_SERIES[2]]) / steps,
           "die_phase_ms_per_step": per_step}
    return out | ({"speculation": speculation(drafts, accepted)} if drafts else {})


CACHE_SERIES = ("cmx_prompt_tokens_total", "cmx_prompt_tokens_cached_total")  # the gateway's


def hit_rate(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    queries = after[CACHE_SERIES[0]] - before[CACHE_SERIES[0]]
    hits = after[CACHE_SERIES[1]] - before[CACHE_SERIES[1]]
    return {"queried_tokens": queries, "hit_tokens": hits, "hit_rate": hits / queries if queries else 0.0}
