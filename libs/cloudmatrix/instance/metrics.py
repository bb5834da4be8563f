"""Prometheus metrics of a prefill or decode instance (the schedulers), registered by the service
at start-up (never at import, so one test process can import every service).

Request and cache gauges are read from the live core at each scrape; step times are histograms,
measured wall seconds and modeled CloudMatrix384 seconds apart."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_STEP_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MODELED_SECONDS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0)


class SchedulerCollector:
    """cmx:num_requests_running / waiting, cmx:kv_cache_usage_ratio, cmx:num_preemptions_total,
    and (prefill) the context cache's cmx:prefix_cache_queries_total / hits_total, labelled by
    instance."""

    def __init__(self, instance: str, read: Callable[[], dict[str, float]]) -> None:
        self.instance, self.read = instance, read

    def collect(self):
        values = self.read()
        for name, doc in (("num_requests_running", "Requests in the running batch"),
                          ("num_requests_waiting", "Requests waiting to run"),
                          ("kv_cache_usage_ratio", "Fraction of the instance's die KV blocks in use")):
            gauge = GaugeMetricFamily(f"cmx:{name}", doc, labels=["instance"])
            gauge.add_metric([self.instance], values.get(name, 0.0))
            yield gauge
        for name, doc in (("prefix_cache_queries", "Prompt tokens looked up in the context cache"),
                          ("prefix_cache_hits", "Prompt tokens loaded from the context cache"),
                          ("num_preemptions", "Running requests preempted for KV blocks (recomputed later)")):
            if name in values:
                counter = CounterMetricFamily(f"cmx:{name}", doc, labels=["instance"])
                counter.add_metric([self.instance], values[name])
                yield counter


def register_scheduler_metrics(instance: str, read: Callable[[], dict[str, float]]):
    """Register the gauges; returns the step loop's ``on_step(measured_s, modeled_s, sequences,
    die_phases)`` callback: step histograms; ``cmx:engine_step_sequences_total`` (sequences summed
    over steps: Δsequences / Δ``cmx:engine_step_seconds_count`` is the mean batch size); and
    ``cmx:engine_die_phase_seconds_total{phase}``, where a step's time goes on the dies."""
    REGISTRY.register(SchedulerCollector(instance, read))
    measured = Histogram("cmx:engine_step_seconds", "Measured wall seconds of an engine step", ["instance"],
                         buckets=_STEP_SECONDS)
    modeled = Histogram("cmx:engine_step_modeled_seconds", "Modeled CloudMatrix384 seconds of an engine step",
                        ["instance"], buckets=_MODELED_SECONDS)

    sequences = Counter("cmx:engine_step_sequences", "Sequences stepped, summed over engine steps", ["instance"])
    phases = Counter("cmx:engine_die_phase_seconds", "Measured seconds of the dies' Forward by phase (mean over "
                     "the dies, summed over steps): forward, compute, dispatch, combine, sample", ["instance", "phase"])

    def on_step(measured_s: float, modeled_s: float, count: int, die_phases: dict[str, float]) -> None:
        measured.labels(instance).observe(measured_s)
        modeled.labels(instance).observe(modeled_s)
        sequences.labels(instance).inc(count)
        for phase, seconds in die_phases.items():
            phases.labels(instance, phase).inc(seconds)

    return on_step
