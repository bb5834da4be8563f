"""Cross-checks that tie the request-level simulation to the rest (`cmx simulate --crosscheck`):

(a) a closed loop of fixed-length requests against the analytic decode model's TPOT for the same
    batch and mean context;
(c) the paper's context-caching rows (prefill throughput and TTFT at 50% and 90% reuse) predicted
    from request streams with that reuse.

(b), the emulator's own schedule against the replay's, is replay/emulator.py with
scripts/crosscheck_emulator.py (it serves a trace on a local topology first)."""
from __future__ import annotations

import dataclasses
import statistics

from cloudmatrix.simulator.calibration import FITTED
from cloudmatrix.simulator.decode import DecodeSetup, paper_proportions, simulate_decode
from cloudmatrix.simulator.replay.engine import Deployment, Replay, span_s
from cloudmatrix.simulator.replay.report import tpot_s
from cloudmatrix.simulator.replay.workload import MOONCAKE_BLOCK_TOKENS, TraceRequest, synthetic

PAPER_CONTEXT_CACHE = {0.5: {"throughput_x": 1.42, "ttft_change": -0.34},
                       0.9: {"throughput_x": 2.28, "ttft_change": -0.59}}
PROMPT_BLOCKS = 10  # prompts of 10 x 512 tokens, so that 50% and 90% reuse are whole blocks


def decode_steady_state(dies: int = 32, per_die: int = 16, prompt: int = 1024, output: int = 256) -> dict:
    """(a): the closed loop's mean TPOT (after two generations of requests) against the model's."""
    deployment = Deployment(prefill_instances=4, prefill_dies=32, decode_dies=dies, decode_batch_per_die=per_die,
                            context_cache=False)
    n = dies * per_die
    replay = Replay(synthetic(4 * n, 0.0, prompt, output), deployment, closed_loop=n).run()
    steady = [t for t in list(replay.tracks.values())[2 * n:] if t.done is not None]
    measured = statistics.mean(tpot_s(t) for t in steady)
    setup = DecodeSetup(batch_per_die=per_die, kv_len=prompt + output // 2, **paper_proportions(dies),
                        imbalance=FITTED.eplb_residual, round_slowdown=FITTED.round_slowdown)
    analytic = simulate_decode(setup, eff=FITTED.efficiency()).tpot_s
    return {"dies": dies, "batch_per_die": per_die, "prompt": prompt, "output": output, "requests": len(steady),
            "replay_tpot_ms": measured * 1e3, "analytic_tpot_ms": analytic * 1e3, "error": measured / analytic - 1}


def _stream(reuse: float, count: int, rate: float, seed: int) -> list[TraceRequest]:
    """Prompts whose first ``reuse`` share of blocks every request shares; the rest its own."""
    shared = round(reuse * PROMPT_BLOCKS)
    base = synthetic(count, rate, PROMPT_BLOCKS * MOONCAKE_BLOCK_TOKENS, 2, seed=seed)
    return [dataclasses.replace(r, blocks=tuple(range(shared)) + tuple(1000 + i * PROMPT_BLOCKS + b
                                                                       for b in range(PROMPT_BLOCKS - shared)))
            for i, r in enumerate(base)]


def context_cache(reuse: float, count: int = 600) -> dict:
    """(c) at one reuse: one prefill instance (32 dies) saturated by a closed loop for throughput,
    then a Poisson stream at half its no-reuse capacity for the mean TTFT."""
    one = Deployment(prefill_instances=1, decode_dies=32)

    def throughput(r: float) -> float:
        replay = Replay(_stream(r, count, 0.0, 0), one, closed_loop=128, prefill_only=True).run()
        return sum(t.prompt for t in replay.tracks.values()) / span_s(replay)

    def ttft(r: float, rate: float) -> float:
        replay = Replay(_stream(r, count, rate, 1), one, prefill_only=True).run()
        return statistics.mean(t.first_token - t.arrival for t in replay.tracks.values())

    cold = throughput(0.0)
    rate = 0.5 * cold / (PROMPT_BLOCKS * MOONCAKE_BLOCK_TOKENS)
    paper = PAPER_CONTEXT_CACHE[reuse]
    return {"reuse": reuse, "throughput_x": throughput(reuse) / cold, "paper_throughput_x": paper["throughput_x"],
            "ttft_change": ttft(reuse, rate) / ttft(0.0, rate) - 1, "paper_ttft_change": paper["ttft_change"],
            "load_requests_per_s": rate}
