"""The gateway's Prometheus metrics (default registry; one process = one gateway).

Measured wall seconds and modeled CloudMatrix384 seconds are separate metrics, never mixed.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.gateway.admission import Admission
from services.gateway.schema import PrefillOutcome

_SECONDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)
_MODELED_SECONDS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0)

TTFT = Histogram("cmx:time_to_first_token_seconds", "Measured time to the first token (queue + prefill)",
                 buckets=_SECONDS)
TTFT_MODELED = Histogram("cmx:time_to_first_token_modeled_seconds",
                         "Modeled CloudMatrix384 time to the first token (the prefill's modeled time)",
                         buckets=_MODELED_SECONDS)
TTFT_PHASE = Histogram("cmx:time_to_first_token_phase_seconds",
                       "Measured time to the first token by phase: the gateway's admission wait and the "
                       "prefill instance's queue, cache_lookup, cache_load, compute and kv_write",
                       ["phase"], buckets=_SECONDS)
ITL = Histogram("cmx:inter_token_latency_seconds", "Measured time between consecutive tokens at the gateway",
                buckets=_SECONDS)
E2E = Histogram("cmx:e2e_request_latency_seconds", "Measured time from arrival to the last token",
                buckets=_SECONDS)
RUNNING = Gauge("cmx:num_requests_running", "Requests holding an admission slot")
WAITING = Gauge("cmx:num_requests_waiting", "Requests waiting for an admission slot")
CACHE_QUERIES = Counter("cmx:prefix_cache_queries", "Prompt tokens looked up in the context cache")
CACHE_HITS = Counter("cmx:prefix_cache_hits", "Prompt tokens served from the context cache")
REQUESTS = Counter("cmx:requests", "Finished requests by outcome", ["finish_reason"])


def observe_first_token(ttft_s: float, admission_s: float, prefill: PrefillOutcome, prompt_tokens: int) -> None:
    TTFT.observe(ttft_s)
    CACHE_QUERIES.inc(prompt_tokens)
    CACHE_HITS.inc(prefill.cached_tokens)
    TTFT_MODELED.observe(prefill.modeled_s)
    TTFT_PHASE.labels("admission").observe(admission_s)
    for phase, seconds in prefill.measured.items():
        TTFT_PHASE.labels(phase).observe(seconds)


def observe_finish(reason: str, e2e_s: float) -> None:
    """``reason``: stop, length, rejected (over capacity), error, or cancelled (the client left);
    only finished requests count toward the end-to-end latency."""
    REQUESTS.labels(reason).inc()
    if reason in ("stop", "length"):
        E2E.observe(e2e_s)


def track_admission(admission: Admission) -> None:
    """Read the running / waiting gauges from ``admission`` at every scrape."""
    RUNNING.set_function(lambda: admission.running)
    WAITING.set_function(lambda: admission.waiting)
