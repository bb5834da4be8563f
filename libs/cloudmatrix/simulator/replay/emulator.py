"""Cross-check (b): the serving suite's own run of a trace against the replay of the same requests
through the same schedulers, with each step priced by a profile fitted on the suite's measured
steps on this host. If the replay's schedule is the serving system's, the same requests share the
same prefill steps, hit the same cached prefixes, and the latencies land close.

Inputs are what a `cmx up` + `cmx bench serve --trace` run leaves: the spans (``engine.step`` of
each instance with its requests, ``gateway.generate`` per request with its token counts,
``prefill.cache`` with the cached tokens) and the benchmark's JSON (client-side TTFT / TPOT)."""
from __future__ import annotations

import dataclasses
import itertools

import torch

from cloudmatrix.instance.scheduler import SchedulerLimits
from cloudmatrix.instance.settings import InstanceSettings
from cloudmatrix.instance.step import ScheduledChunk
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.simulator.replay.engine import Deployment, Replay, RoleShape
from cloudmatrix.simulator.replay.report import Slo, summary
from cloudmatrix.simulator.replay.workload import TraceRequest


@dataclasses.dataclass(frozen=True)
class HostProfile:
    """A step's seconds on this host: ``a + b x tokens + c x sequences``, fitted on measured steps."""

    dies: int
    a: float
    b: float
    c: float
    acceptance: float = 0.0

    def step_s(self, chunks: list[ScheduledChunk]) -> float:
        return self.a + self.b * sum(c.slots for c in chunks) + self.c * len(chunks)


def fit_profile(steps: list[dict], dies: int) -> HostProfile:
    """Least squares (non-negative by clamping) over the steps' (tokens, sequences) -> seconds.
    Tried and left: the decode steps that overlapped a prefill step on this host's shared cores
    took 1.32x longer (median), but a separate contention factor fitted worse on this data (the
    prefill steps that ran alone were the first, cold burst)."""
    if len(steps) < 3:
        raise ValueError(f"need at least 3 measured steps to fit a profile, got {len(steps)}")
    x = torch.tensor([[1.0, s["tokens"], s["sequences"]] for s in steps], dtype=torch.float64)
    y = torch.tensor([[s["seconds"]] for s in steps], dtype=torch.float64)
    a, b, c = (max(0.0, float(v)) for v in torch.linalg.lstsq(x, y).solution.flatten())
    return HostProfile(dies, a, b, c)


def suite_steps(spans: list[dict], instance: str) -> list[dict]:
    """The ``engine.step`` spans of one instance, in time order."""
    out = [{"start": s["start_unix_nano"] / 1e9, "seconds": s["duration_s"], "tokens": s["attributes"]["tokens"],
            "sequences": s["attributes"]["sequences"], "requests": tuple(s["attributes"]["request_ids"])}
           for s in spans if s["name"] == "engine.step" and s["resource"]["service.instance.id"] == instance]
    return sorted(out, key=lambda s: s["start"])


def suite_requests(spans: list[dict], trace: list[TraceRequest]) -> tuple[list[TraceRequest], dict[str, int]]:
    """The requests as the gateway served them (arrival, prompt and completion tokens), in arrival
    order, with the trace's block ids (matched in order, by prompt length among equal arrivals),
    and each gateway request id's index."""
    generated = sorted((s for s in spans if s["name"] == "gateway.generate"), key=lambda s: s["start_unix_nano"])
    if not generated:
        raise ValueError("no gateway.generate spans: was the run traced?")
    start = generated[0]["start_unix_nano"]
    unmatched = list(range(len(trace)))
    requests, index = [], {}
    for i, s in enumerate(generated):
        a = s["attributes"]
        j = next((j for j in unmatched if trace[j].prompt == a["prompt_tokens"]), unmatched[0] if unmatched else None)
        blocks = trace[j].blocks if j is not None else ()
        if j is not None:
            unmatched.remove(j)
        requests.append(TraceRequest((s["start_unix_nano"] - start) / 1e9, a["prompt_tokens"],
                                     max(1, a.get("completion_tokens", 1)), blocks,
                                     trace[0].block_tokens if trace else 16))
        index[a["request_id"]] = i
    return requests, index


def co_step_pairs(steps: list[tuple[int, ...]]) -> set[tuple[int, int]]:
    """Pairs of requests that ran in one step together."""
    return {pair for members in steps for pair in itertools.combinations(sorted(set(members)), 2)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def compare(spans: list[dict], trace: list[TraceRequest], serve: dict, cfg: ModelConfig,
            prefill: InstanceSettings, decode: InstanceSettings, blocks_per_die: int) -> dict:
    """The suite's run against its replay: which requests shared prefill steps, cached prefixes,
    decode batch sizes, and TTFT / TPOT percentiles (the suite's from the benchmark client)."""
    requests, index = suite_requests(spans, trace)
    steps = {role: suite_steps(spans, f"{role}-0") for role in ("prefill", "decode")}
    profiles = {role: fit_profile(steps[role], 2) for role in steps}
    shapes = {role: RoleShape(SchedulerLimits(max_running=s.max_running, max_waiting=s.max_waiting,
                                              max_step_tokens=s.max_step_tokens), s.chunk_tokens, blocks_per_die,
                              s.batch_wait_s)
              for role, s in (("prefill", prefill), ("decode", decode))}
    deployment = Deployment(prefill_instances=1, prefill_dies=2, decode_dies=2, mtp=False,
                            block_tokens=prefill.block_size, pool_gib=1.0)
    replay = Replay(requests, deployment, cfg=cfg, shapes=shapes, costs=profiles)
    for instance in replay.prefills + replay.decodes:
        instance.stepped = []
    replay.run()
    sim_index = {rid: int(rid[1:]) for rid in replay.tracks}
    suite_pairs = co_step_pairs([tuple(index[r] for r in s["requests"] if r in index) for s in steps["prefill"]])
    sim_pairs = co_step_pairs([tuple(sim_index[r] for r in ids) for ids in replay.prefills[0].stepped])
    cached = {index[s["attributes"]["request_id"]]: s["attributes"].get("cached_tokens", 0)
              for s in spans if s["name"] == "prefill.cache" and s["attributes"].get("request_id") in index}
    sim = summary(replay, Slo())
    same_hits = sum(cached.get(i, 0) == t.cached for i, t in enumerate(replay.tracks.values()))
    suite_batch = [s["sequences"] for s in steps["decode"]]
    sim_batch = [len(ids) for ids in replay.decodes[0].stepped]
    latency = {f"{m}_{p}": {"suite_ms": serve["summary"][m][f"{p}_ms"], "replay_ms": sim[m][f"{p}_ms"],
                            "error": sim[m][f"{p}_ms"] / serve["summary"][m][f"{p}_ms"] - 1}
               for m in ("ttft", "tpot") for p in ("p50", "p90")}
    return {"requests": len(requests),
            "profiles": {r: {k: getattr(p, k) for k in ("a", "b", "c")} for r, p in profiles.items()},
            "prefill_steps": {"suite": len(steps["prefill"]), "replay": len(replay.prefills[0].stepped)},
            "prefill_co_step_pairs": {"suite": len(suite_pairs), "replay": len(sim_pairs),
                                      "jaccard": jaccard(suite_pairs, sim_pairs)},
            "cached_tokens_equal": same_hits / len(requests),
            "cache_hit_rate": {"suite": sum(cached.values()) / sum(r.prompt for r in requests),
                               "replay": sim["context_cache"]["hit_rate"]},
            "decode_batch_mean": {"suite": sum(suite_batch) / len(suite_batch),
                                  "replay": sum(sim_batch) / max(1, len(sim_batch))},
            "preemptions": {"replay": sim["preemptions"]}, "latency": latency}
