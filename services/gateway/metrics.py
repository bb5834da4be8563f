"""The gateway's Prometheus metrics (default registry; one process = one gateway).

Names follow Prometheus' conventions (``cmx_`` prefix, no colons: those are for recording rules)
and vLLM's labels (``model_name`` on every series; no ``instance`` label of our own, which would
collide with the target label Prometheus adds). Each event is counted in one process only: the
context cache's query / hit counters come from the prefill instances, the gateway counts the
prompt tokens it sent and how many of them were cached. Measured wall seconds and modeled
CloudMatrix384 seconds are separate metrics, never mixed.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.gateway.admission import Admission
from services.gateway.schema import PrefillOutcome

_SECONDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)
_MODELED_SECONDS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
MODEL = ["model_name"]

TTFT = Histogram("cmx_time_to_first_token_seconds", "Measured time to the first token (queue + prefill)", MODEL,
                 buckets=_SECONDS)
TTFT_MODELED = Histogram("cmx_time_to_first_token_modeled_seconds",
                         "Modeled CloudMatrix384 time to the first token (the prefill's modeled time)", MODEL,
                         buckets=_MODELED_SECONDS)
TTFT_PHASE = Histogram("cmx_time_to_first_token_phase_seconds",
                       "Measured time to the first token by phase: the gateway's admission wait and the "
                       "prefill instance's queue, cache_lookup, cache_load and compute (its kv_write follows the first token)",
                       MODEL + ["phase"], buckets=_SECONDS)
ITL = Histogram("cmx_inter_token_latency_seconds", "Measured time between consecutive tokens at the gateway",
                MODEL, buckets=_SECONDS)
E2E = Histogram("cmx_e2e_request_latency_seconds", "Measured time from arrival to the last token", MODEL,
                buckets=_SECONDS)
RUNNING = Gauge("cmx_num_requests_running", "Requests holding an admission slot at the gateway", MODEL)
WAITING = Gauge("cmx_num_requests_waiting", "Requests waiting for an admission slot at the gateway", MODEL)
PROMPT_TOKENS = Counter("cmx_prompt_tokens", "Prompt tokens of requests that reached a prefill instance", MODEL)
CACHED_PROMPT_TOKENS = Counter("cmx_prompt_tokens_cached",
                               "Of cmx_prompt_tokens_total, those whose KV came from the context cache", MODEL)
GENERATION_TOKENS = Counter("cmx_generation_tokens", "Tokens generated and sent to clients", MODEL)
REQUEST_PROMPT_TOKENS = Histogram("cmx_request_prompt_tokens", "Prompt tokens per request", MODEL,
                                  buckets=_TOKENS)
REQUEST_GENERATION_TOKENS = Histogram("cmx_request_generation_tokens", "Generated tokens per finished request",
                                      MODEL, buckets=_TOKENS)
MIGRATIONS = Counter("cmx_request_migrations", "Requests moved to another decode instance mid-stream (theirs failed)",
                     MODEL)
REQUESTS = Counter("cmx_requests", "Requests by outcome: stop, length (finished), invalid (400 / INVALID_ARGUMENT), "
                   "rejected (over capacity), timeout (past its deadline), unavailable (no instance could serve it), "
                   "error (an instance failed), cancelled (the client left)", MODEL + ["finish_reason"])


class GatewayMetrics:
    """The gateway's series for one served model."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        # the per-request and per-token series, bound once (a label lookup takes a lock)
        self.ttft = TTFT.labels(model_name)
        self.ttft_modeled = TTFT_MODELED.labels(model_name)
        self.itl = ITL.labels(model_name)
        self.prompt_tokens = PROMPT_TOKENS.labels(model_name)
        self.cached_prompt_tokens = CACHED_PROMPT_TOKENS.labels(model_name)
        self.generation_tokens = GENERATION_TOKENS.labels(model_name)
        self.request_prompt_tokens = REQUEST_PROMPT_TOKENS.labels(model_name)
        self.request_generation_tokens = REQUEST_GENERATION_TOKENS.labels(model_name)
        self.e2e = E2E.labels(model_name)
        self.migrations = MIGRATIONS.labels(model_name)

    def observe_first_token(self, ttft_s: float, admission_s: float, prefill: PrefillOutcome,
                            prompt_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_prompt_tokens.inc(prefill.cached_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.ttft_modeled.observe(prefill.modeled_s)
        TTFT_PHASE.labels(self.model_name, "admission").observe(admission_s)
        for phase, seconds in prefill.measured.items():
            TTFT_PHASE.labels(self.model_name, phase).observe(seconds)

    def observe_tokens(self, count: int) -> None:
        self.generation_tokens.inc(count)

    def observe_finish(self, reason: str, e2e_s: float, generated: int) -> None:
        """``reason``: see REQUESTS; only finished requests count toward the end-to-end latency and
        the tokens-per-request histogram."""
        REQUESTS.labels(self.model_name, reason).inc()
        if reason in ("stop", "length"):
            self.e2e.observe(e2e_s)
            self.request_generation_tokens.observe(generated)

    def observe_invalid(self) -> None:
        """A request refused as malformed before it was admitted."""
        REQUESTS.labels(self.model_name, "invalid").inc()

    def track_admission(self, admission: Admission) -> None:
        """Read the running / waiting gauges from ``admission`` at every scrape."""
        RUNNING.labels(self.model_name).set_function(lambda: admission.running)
        WAITING.labels(self.model_name).set_function(lambda: admission.waiting)
