"""Request-level simulation (`cmx simulate --trace`): the virtual-time engine drives the serving
system's own Scheduler class (a change to its admission rule changes the simulated schedule), a
closed loop of fixed-length requests reproduces the analytic decode model's TPOT within 5%
(cross-check (a)), the context-cache pool against a brute-force LRU, the shipped Mooncake trace
replayed end to end, and the CLI."""
from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from cloudmatrix.cli.main import main
from cloudmatrix.instance.scheduler import Scheduler
from cloudmatrix.simulator.replay.crosscheck import context_cache, decode_steady_state
from cloudmatrix.simulator.replay.engine import ContextPool, Deployment, Replay
from cloudmatrix.simulator.replay.report import Slo, summary
from cloudmatrix.simulator.replay.workload import TraceRequest, read_mooncake, synthetic

TRACE = Path(__file__).resolve().parents[1] / "traces" / "mooncake_conversation_trace.jsonl"
SMALL = Deployment(prefill_instances=2, prefill_dies=8, decode_instances=1, decode_dies=8)


def test_the_engine_drives_the_serving_scheduler_itself(monkeypatch):
    """Not a copy: the instances hold the serving Scheduler, and changing its admission rule (here:
    one request at a time per instance) changes what the replay schedules."""
    requests = synthetic(40, 0.0, 2048, 16)
    free = Replay(requests, SMALL).run()
    assert all(type(i.scheduler) is Scheduler for i in free.prefills + free.decodes)
    original = Scheduler._admit

    def one_at_a_time(self, request, plan):
        return not self.running and original(self, request, plan)

    monkeypatch.setattr(Scheduler, "_admit", one_at_a_time)
    serial = Replay(requests, SMALL).run()
    assert sum(i.steps for i in serial.prefills) > sum(i.steps for i in free.prefills)
    first = [t.first_token for t in free.tracks.values()]
    assert [t.first_token for t in serial.tracks.values()] != first
    assert max(t.done for t in serial.tracks.values()) > max(t.done for t in free.tracks.values())


def test_a_closed_loop_reproduces_the_analytic_decode_tpot():
    """Cross-check (a): 16 sequences per die on a 32-die decode instance, 1024 + 256 tokens, MTP
    at 0.7 acceptance; the steady state's TPOT against `cmx simulate`'s (simulate_decode) for the
    same batch and mean context (prompt + output / 2)."""
    a = decode_steady_state(dies=32, per_die=16, prompt=1024, output=256)
    assert a["requests"] >= 512 and abs(a["error"]) <= 0.05, a


def test_context_caching_from_streams_with_that_reuse_moves_the_way_the_paper_does():
    """Cross-check (c), reported beside the paper's rows (docs/simulator.md); here only its
    direction: more reuse, more prefill throughput and a shorter TTFT."""
    half, most = context_cache(0.5, count=300), context_cache(0.9, count=300)
    assert 1 < half["throughput_x"] < most["throughput_x"] and most["ttft_change"] < half["ttft_change"] < 0


def test_the_context_pool_is_the_brute_force_lru():
    rng = random.Random(3)
    pool, reference = ContextPool(40 * 512 * 1000, 1000), []  # room for 40 blocks of 1000 bytes per token
    for _ in range(400):
        blocks = tuple(rng.randrange(60) for _ in range(rng.randrange(1, 8)))
        request = TraceRequest(0.0, 512 * len(blocks) + 1, 4, blocks)
        hit = 0
        for b in blocks:
            if b not in reference:
                break
            reference.remove(b)
            reference.append(b)
            hit += 1
        assert pool.cached_tokens(request) == 512 * hit
        pool.write(request)
        for b in blocks:
            if b in reference:
                reference.remove(b)
            reference.append(b)
        del reference[:-40]
        assert list(pool.blocks) == reference


def test_the_shipped_trace_replays_end_to_end():
    requests = read_mooncake(TRACE, limit=300)
    replay = Replay(requests, Deployment()).run()
    s = summary(replay, Slo(2.0, 0.05))
    assert s["completed"] == 300 and s["failed"] == 0
    for track, request in zip(replay.tracks.values(), requests):
        assert track.tokens == request.output and track.first_token > track.arrival  # every token, once
        assert track.done >= track.first_token and track.cached < track.prompt
    assert 0 < s["context_cache"]["hit_rate"] < 1 and s["ttft"]["p50_ms"] > 0 and s["tpot"]["p50_ms"] > 0
    assert 0 < s["utilisation"]["prefill"] <= 1 and 0 < s["utilisation"]["decode"] <= 1
    assert s["goodput"]["requests"] <= s["completed"]


def test_trace_lines_that_are_not_mooncake_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [1]}\n{"timestamp": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_mooncake(bad)
    twice = read_mooncake(TRACE, limit=50, rate_scale=2.0)
    assert twice[-1].arrival_s == pytest.approx(read_mooncake(TRACE, limit=50)[-1].arrival_s / 2)


def test_poisson_arrivals_have_the_asked_rate_and_lengths_their_distribution():
    arrivals = [r.arrival_s for r in synthetic(4000, 5.0, 100, 10, seed=1)]
    assert statistics.mean(b - a for a, b in zip(arrivals, arrivals[1:])) == pytest.approx(0.2, rel=0.05)
    uniform = synthetic(4000, 5.0, 1000, 100, lengths="uniform")
    assert min(r.prompt for r in uniform) >= 500 and max(r.prompt for r in uniform) <= 1500
    exponential = synthetic(4000, 5.0, 1000, 100, lengths="exponential")
    assert statistics.mean(r.prompt for r in exponential) == pytest.approx(1000, rel=0.06)
    assert statistics.median(r.prompt for r in exponential) == pytest.approx(693, rel=0.08)  # ln 2 x the mean
    with pytest.raises(ValueError, match="lengths"):
        synthetic(5, 1.0, 10, 10, lengths="zipf")


def test_cli_trace_replay_prints_and_writes_json_and_plot(capsys, tmp_path):
    out = tmp_path / "replay.json"
    assert main(["simulate", "--trace", str(TRACE), "--limit", "120", "--slo", "ttft=3s,tpot=60ms",
                 "--json", str(out), "--plot", str(tmp_path / "replay.png")]) == 0
    text = capsys.readouterr().out
    assert "120 of 120 requests" in text and "goodput" in text and "context cache hit rate" in text
    report = json.loads(out.read_text())
    assert report["goodput"]["slo_ttft_ms"] == 3000 and report["completed"] == 120
    assert (tmp_path / "replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["simulate", "--synthetic", "poisson", "--rate", "2", "--count", "30", "--prompt", "1000",
                 "--output", "20", "--decode-dies", "16", "--json", "-", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "synthetic-poisson.png").is_file()  # plotted by default
    text = capsys.readouterr().out
    report = json.loads(text[text.index("\n{") + 1:])
    assert report["source"] == "synthetic poisson" and report["deployment"]["decode_dies"] == 16
    assert report["completed"] == 30 and report["context_cache"]["hit_rate"] == 0.0  # no shared blocks
    assert main(["simulate", "--trace", str(TRACE), "--slo", "latency=1s"]) == 2
    assert "slo" in capsys.readouterr().err


def test_plan_picks_the_cheapest_deployment_that_meets_the_slo_and_it_meets_it_when_replayed():
    from cloudmatrix.simulator.replay.plan import evaluate, plan

    requests = synthetic(120, 3.0, 8192, 48, seed=2)
    slo = Slo(ttft_s=1.5, tpot_s=0.04)
    result = plan(requests, slo, attainment=0.9, max_prefill_instances=4)
    assert result.pick is not None and result.pick.meets(0.9) and result.confirmed.meets(0.9)
    met = [o for o in result.ranked if o.meets(0.9)]
    assert result.pick.npus == min(o.npus for o in met)
    again = evaluate(requests, result.pick.deployment, slo, seed=7)  # an independent replay
    assert again.share >= 0.9


def test_cli_plan_prints_the_ranking_and_the_pick(capsys, tmp_path):
    assert main(["plan", "--synthetic", "3", "--count", "80", "--prompt", "8192", "--output", "32",
                 "--slo", "ttft=1.5s,tpot=40ms", "--attainment", "0.9", "--max-prefill-instances", "3",
                 "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "pick:" in out and "P:D" in out and "NPUs" in out
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["pick"]["share"] >= 0.9 and report["pick_replayed_share"] >= 0.9
    assert main(["plan", "--synthetic", "3", "--attainment", "1.5"]) == 2


def test_the_host_profile_fit_recovers_known_step_costs_and_the_schedule_metrics():
    """Cross-check (b)'s pieces: the least-squares profile against steps made from known
    coefficients (with noise), and the co-step pair comparison against a hand count."""
    from cloudmatrix.simulator.replay.emulator import co_step_pairs, fit_profile, jaccard

    rng = random.Random(5)
    steps = []
    for _ in range(200):
        tokens, seqs = rng.randrange(1, 4096), rng.randrange(1, 32)
        steps.append({"tokens": tokens, "sequences": seqs,
                      "seconds": (0.004 + 2e-5 * tokens + 3e-4 * seqs) * (1 + rng.gauss(0, 0.01))})
    profile = fit_profile(steps, dies=2)
    assert (profile.a, profile.b, profile.c) == pytest.approx((0.004, 2e-5, 3e-4), rel=0.1)
    with pytest.raises(ValueError, match="at least 3"):
        fit_profile(steps[:2], dies=2)
    pairs = co_step_pairs([(1, 2, 3), (4,), (2, 3)])
    assert pairs == {(1, 2), (1, 3), (2, 3)}
    assert jaccard(pairs, {(1, 2), (4, 5)}) == pytest.approx(1 / 4)


def test_a_replay_runs_on_hopper_gpus_too(capsys, tmp_path):
    gpus = Deployment(prefill_instances=2, prefill_dies=8, decode_dies=16, hardware="h800")
    replay = Replay(synthetic(60, 4.0, 4096, 32, seed=3), gpus).run()
    assert all(t.done is not None for t in replay.tracks.values()) and gpus.npus == 32
    out = tmp_path / "out"
    assert main(["simulate", "--trace", str(TRACE), "--limit", "40", "--hardware", "h100", "--prefill-dies", "8",
                 "--decode-dies", "16", "--out", str(out)]) == 0
    assert "on h100" in capsys.readouterr().out
    assert json.loads((out / "mooncake_conversation_trace.json").read_text())["deployment"]["hardware"] == "h100"
    with pytest.raises(ValueError, match="hardware"):
        Deployment(hardware="tpu")
