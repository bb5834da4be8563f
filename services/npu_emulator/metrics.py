"""A die's Prometheus metrics, read from the die at scrape time (nothing on the Forward path but
a few additions): its Forwards, tokens and phases, and the tokens each of its routed experts
computed (the expert load EPLB balances).

Labels: ``model_name`` (the loaded model; "" before a load) and ``die`` (the die's place in its
instance; Prometheus' target labels tell the processes apart). Expert load
across dies and its imbalance are PromQL away, e.g. the max/mean die load over 5 minutes:
``max(sum by (die) (rate(cmx_expert_tokens_total[5m]))) / avg(sum by (die) (rate(cmx_expert_tokens_total[5m])))``.
"""
from __future__ import annotations

import dataclasses
from pathlib import PurePath

from prometheus_client.core import CounterMetricFamily

from services.npu_emulator.core import Die


@dataclasses.dataclass
class DieCounters:
    """Running totals since the process started (they survive model reloads)."""

    forwards: int = 0
    sequences: int = 0
    tokens: int = 0
    phase_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    modeled_seconds: float = 0.0

    def record(self, sequences: int, tokens: int, measured: dict[str, float], modeled_s: float) -> None:
        self.forwards += 1
        self.sequences += sequences
        self.tokens += tokens
        for phase, seconds in measured.items():
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds
        self.modeled_seconds += modeled_s


class DieCollector:
    def __init__(self, die: Die, counters: DieCounters) -> None:
        self.die, self.counters = die, counters

    def collect(self):
        # the model's name: a die loads by checkpoint path; the directory names the model, as for the instances.
        # die: its place in the instance it serves (the LoadModel's die id) once loaded
        model = PurePath(self.die.model_id).name if self.die.model_id else ""
        engine = self.die.engine
        die = engine.link.die_id if engine is not None else self.die.identity.die_id
        labels, values = ["model_name", "die"], [model, str(die)]
        c = self.counters
        for name, doc, value in (("die_forwards", "Forward calls this die ran", c.forwards),
                                 ("die_sequences", "Sequences over this die's Forwards", c.sequences),
                                 ("die_tokens", "Tokens this die's Forwards computed", c.tokens),
                                 ("die_forward_modeled_seconds", "Modeled CloudMatrix384 seconds of this die's "
                                  "Forwards", c.modeled_seconds)):
            family = CounterMetricFamily(f"cmx_{name}", doc, labels=labels)
            family.add_metric(values, value)
            yield family
        phases = CounterMetricFamily("cmx_die_forward_seconds", "Measured seconds of this die's Forwards by phase: "
                                     "total, compute, dispatch, combine (waits for the fabric rounds), sample",
                                     labels=labels + ["phase"])
        for phase, seconds in sorted(c.phase_seconds.items()):
            phases.add_metric(values + [phase], seconds)
        yield phases
        yield self._expert_tokens(labels, values)

    def _expert_tokens(self, labels: list[str], values: list[str]) -> CounterMetricFamily:
        family = CounterMetricFamily("cmx_expert_tokens", "Tokens each routed expert on this die computed "
                                     "(reset when an EPLB pass reads the load with reset)",
                                     labels=labels + ["layer", "expert"])
        engine = self.die.engine
        if engine is None:
            return family
        for layer, moe in engine.moe_layers.items():
            counts = moe.token_counts.tolist()
            for expert in moe.experts:
                family.add_metric(values + [str(layer), expert], counts[int(expert)])
        return family
