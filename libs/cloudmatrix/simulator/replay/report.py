"""What a replay measured: TTFT / TPOT / ITL / end-to-end percentiles, goodput under an SLO,
the context cache's hit rate, the instances' utilisation, KV occupancy, preemptions, queueing;
as JSON, printed, and plotted."""
from __future__ import annotations

import dataclasses

from cloudmatrix.percentiles import distribution
from cloudmatrix.simulator.replay.engine import Replay, Track, span_s


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.05


def tpot_s(t: Track) -> float | None:
    return (t.last_token - t.first_token) / (t.tokens - 1) if t.tokens > 1 else None


def summary(replay: Replay, slo: Slo) -> dict:
    tracks = list(replay.tracks.values())
    done = [t for t in tracks if t.done is not None]
    ttft = [t.first_token - t.arrival for t in done]
    tpots = [v for v in (tpot_s(t) for t in done) if v is not None]
    good = [t for t in done if t.first_token - t.arrival <= slo.ttft_s and (tpot_s(t) or 0.0) <= slo.tpot_s]
    span = span_s(replay)
    usage = [u for _, u in replay.kv_usage]
    prompt_tokens = sum(t.prompt for t in done) or 1
    return {
        "requests": len(tracks), "completed": len(done), "failed": sum(t.failed is not None for t in tracks),
        "simulated_s": span,
        "ttft": distribution(ttft), "tpot": distribution(tpots),
        "itl": distribution([g for t in done for g in t.gaps]),
        "e2e": distribution([t.done - t.arrival for t in done]),
        "queueing": distribution([t.first_step - t.arrival for t in done if t.first_step is not None]),
        "goodput": {"slo_ttft_ms": slo.ttft_s * 1e3, "slo_tpot_ms": slo.tpot_s * 1e3, "requests": len(good),
                    "share": len(good) / len(done) if done else 0.0, "requests_per_s": len(good) / span},
        "throughput": {"output_tokens_per_s": sum(t.tokens for t in done) / span,
                       "prompt_tokens_per_s": prompt_tokens / span,
                       "output_tokens_per_s_per_npu": sum(t.tokens for t in done) / span / replay.d.npus},
        "context_cache": {"hit_rate": sum(t.cached for t in done) / prompt_tokens,
                          "cached_tokens": sum(t.cached for t in done), "prompt_tokens": prompt_tokens},
        "utilisation": {"prefill": _busy(replay.prefills, span), "decode": _busy(replay.decodes, span)},
        "kv_occupancy": {"mean": sum(usage) / len(usage) if usage else 0.0, "peak": max(usage, default=0.0)},
        "preemptions": sum(i.scheduler.preemptions for i in replay.prefills + replay.decodes),
        "steps": {"prefill": sum(i.steps for i in replay.prefills), "decode": sum(i.steps for i in replay.decodes)},
        "deployment": dataclasses.asdict(replay.d) | {"npus": replay.d.npus},
    }


def _busy(instances, span: float) -> float:
    return sum(i.busy_s for i in instances) / (len(instances) * span) if instances else 0.0


def print_summary(s: dict) -> None:
    d = s["deployment"]
    unit, device = ("die", "NPU") if d["hardware"] == "cloudmatrix384" else ("GPU", "GPU")
    print(f"{s['completed']} of {s['requests']} requests in {s['simulated_s']:,.1f} simulated s "
          f"({s['failed']} failed) on {d['hardware']}; {d['prefill_instances']} x {d['prefill_dies']}-{unit} prefill, "
          f"{d['decode_instances']} x {d['decode_dies']}-{unit} decode ({d['npus']:g} {device}s)")
    for name in ("ttft", "tpot", "itl", "e2e", "queueing"):
        q = s[name]
        print(f"  {name:<9} mean {q['mean_ms']:9.1f} ms  p50 {q['p50_ms']:9.1f}  p90 {q['p90_ms']:9.1f}  "
              f"p99 {q['p99_ms']:9.1f}")
    g, c, u = s["goodput"], s["context_cache"], s["utilisation"]
    print(f"  goodput  {g['requests']} requests ({g['share']:.1%}) within TTFT {g['slo_ttft_ms']:g} ms and TPOT "
          f"{g['slo_tpot_ms']:g} ms: {g['requests_per_s']:.2f} requests/s")
    print(f"  output   {s['throughput']['output_tokens_per_s']:,.0f} tokens/s "
          f"({s['throughput']['output_tokens_per_s_per_npu']:,.1f} per {device})")
    print(f"  context cache hit rate {c['hit_rate']:.1%} of prompt tokens; utilisation prefill {u['prefill']:.1%}, "
          f"decode {u['decode']:.1%}; decode KV occupancy mean {s['kv_occupancy']['mean']:.1%}, peak "
          f"{s['kv_occupancy']['peak']:.1%}; {s['preemptions']} preemptions")
