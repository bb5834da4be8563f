"""Prometheus metrics of a prefill or decode instance (the schedulers), registered by the service
at start-up (never at import, so one test process can import every service).

Request and cache gauges are read from the live core at each scrape; step times are histograms,
measured wall seconds and modeled CloudMatrix384 seconds apart. Every series carries
``model_name`` and ``engine`` (the instance id), as vLLM's do; names use the ``cmx_`` prefix
(colons are for Prometheus recording rules)."""
from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_STEP_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MODELED_SECONDS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0)


LABELS = ["model_name", "engine"]


SPEC_DECODE = (("spec_decode_num_drafts", "Drafts the MTP module proposed and the main model verified"),
               ("spec_decode_num_draft_tokens", "Draft tokens verified"),
               ("spec_decode_num_accepted_tokens", "Draft tokens accepted"))


class SchedulerCollector:
    """cmx_num_requests_running / waiting, cmx_kv_cache_usage_ratio, cmx_num_preemptions_total,
    (prefill) the context cache's cmx_prefix_cache_queries_total / hits_total, and (an instance
    that speculates) vLLM's speculative-decoding counters: cmx_spec_decode_num_drafts_total,
    _num_draft_tokens_total, _num_accepted_tokens_total and _num_accepted_tokens_per_pos_total
    {position}. Acceptance rate = accepted / draft tokens; mean acceptance length (tokens per
    verifying step) = 1 + accepted / drafts."""

    def __init__(self, model_name: str, engine: str, read: Callable[[], dict[str, float]]) -> None:
        self.labels, self.read = [model_name, engine], read

    def collect(self):
        values = self.read()
        for name, doc in (("num_requests_running", "Requests in the running batch"),
                          ("num_requests_waiting", "Requests waiting to run"),
                          ("kv_cache_usage_ratio", "Fraction of the instance's die KV blocks in use")):
            gauge = GaugeMetricFamily(f"cmx_{name}", doc, labels=LABELS)
            gauge.add_metric(self.labels, values.get(name, 0.0))
            yield gauge
        for name, doc in (("prefix_cache_queries", "Prompt tokens looked up in the context cache"),
                          ("prefix_cache_hits", "Prompt tokens loaded from the context cache"),
                          ("num_preemptions", "Running requests preempted for KV blocks (recomputed later)")):
            if name in values:
                counter = CounterMetricFamily(f"cmx_{name}", doc, labels=LABELS)
                counter.add_metric(self.labels, values[name])
                yield counter
        if "spec_decode_num_drafts" in values:
            yield from self._spec_decode(values)

    def _spec_decode(self, values: dict[str, float]):
        for name, doc in SPEC_DECODE:
            counter = CounterMetricFamily(f"cmx_{name}", doc, labels=LABELS)
            counter.add_metric(self.labels, values[name])
            yield counter
        per_position = CounterMetricFamily("cmx_spec_decode_num_accepted_tokens_per_pos",
                                           "Draft tokens accepted, by draft position", labels=LABELS + ["position"])
        per_position.add_metric([*self.labels, "0"], values["spec_decode_num_accepted_tokens"])
        yield per_position


def register_scheduler_metrics(model_name: str, engine: str, read: Callable[[], dict[str, float]]):
    """Register the gauges; returns the step loop's ``on_step(measured_s, modeled_s, sequences,
    die_phases)`` callback: step histograms; ``cmx_engine_step_sequences_total`` (sequences summed
    over steps: Δsequences / Δ``cmx_engine_step_seconds_count`` is the mean batch size); and
    ``cmx_engine_die_phase_seconds_total{phase}``, where a step's time goes on the dies."""
    REGISTRY.register(SchedulerCollector(model_name, engine, read))
    measured = Histogram("cmx_engine_step_seconds", "Measured wall seconds of an engine step", LABELS,
                         buckets=_STEP_SECONDS).labels(model_name, engine)
    modeled = Histogram("cmx_engine_step_modeled_seconds", "Modeled CloudMatrix384 seconds of an engine step",
                        LABELS, buckets=_MODELED_SECONDS).labels(model_name, engine)
    sequences = Counter("cmx_engine_step_sequences", "Sequences stepped, summed over engine steps",
                        LABELS).labels(model_name, engine)
    phases = Counter("cmx_engine_die_phase_seconds", "Measured seconds of the dies' Forward by phase (mean over "
                     "the dies, summed over steps): forward, compute, dispatch, combine, sample", LABELS + ["phase"])

    def on_step(measured_s: float, modeled_s: float, count: int, die_phases: dict[str, float]) -> None:
        measured.observe(measured_s)
        modeled.observe(modeled_s)
        sequences.inc(count)
        for phase, seconds in die_phases.items():
            phases.labels(model_name, engine, phase).inc(seconds)

    return on_step


SPEC_SERIES = ("cmx_spec_decode_num_drafts_total", "cmx_spec_decode_num_accepted_tokens_total")


def scrape(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each unlabelled-or-labelled series ``name`` at ``url``/metrics (0 when absent)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {name: sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))
            for name in names}


def speculation(drafts: float, accepted: float) -> dict:
    """vLLM's view of MTP drafts: acceptance rate (accepted / draft tokens; one draft token each)
    and mean acceptance length (tokens per verifying step, 1 + accepted / drafts)."""
    return {"drafts": int(drafts), "accepted_tokens": int(accepted),
            "acceptance_rate": accepted / drafts if drafts else 0.0,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0}
