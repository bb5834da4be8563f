"""`cmx bench serve` against a small live topology (kvcache, a one-die prefill and decode, the
gateway): the JSON has every field, percentiles are ordered, every request got the tokens it
asked for, plots are written, and prompts sharing a prefix move the context-cache hit rate.
Workload generation and the trace's own reuse are checked by hand-computed cases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloudmatrix.bench.serve import workload
from cloudmatrix.bench.serve.runner import LoadShape, arrival_times
from cloudmatrix.bench.serve.stats import percentile
from cloudmatrix.cli.main import main
from tests.services import running_services

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory, tiny_checkpoint):
    run_dir = tmp_path_factory.mktemp("bench-serve")
    with running_services(run_dir, [("kv0", "kvcache", ()), ("pdie", "npu_emulator", ()),
                                    ("ddie", "npu_emulator", ())]) as r:
        common = (f"checkpoint={tiny_checkpoint}", f"kvcache={r['kv0'].address}")
        with running_services(run_dir, [("prefill", "prefill", common + (f"dies={r['pdie'].address}",)),
                                        ("decode", "decode", common + (f"dies={r['ddie'].address}",))]) as s:
            sets = (f"checkpoint={tiny_checkpoint}", f"prefill={s['prefill'].address}",
                    f"decode={s['decode'].address}")
            with running_services(run_dir, [("gateway", "gateway", sets)]):
                port = json.loads((run_dir / "ready" / "gateway.http.json").read_text())["http_port"]
                yield f"http://127.0.0.1:{port}"


def _ordered(d: dict) -> bool:
    return d["p50_ms"] <= d["p90_ms"] <= d["p99_ms"] and d["mean_ms"] > 0


def test_quick_run_reports_everything(gateway_url, tmp_path):
    assert main(["bench", "serve", "--url", gateway_url, "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serve.json").read_text())
    assert {"config", "machine", "runs", "plots", "threads"} <= set(report)
    assert report["config"]["shared_prefix"] == 0.5 and report["machine"]["cpus"] >= 1
    assert [r["load"] for r in report["runs"]] == [{"mode": "concurrency", "concurrency": c} for c in (1, 4)]
    for run in report["runs"]:
        s = run["summary"]
        assert s["failed"] == 0 and s["completed"] == s["requests"] == 12
        assert s["output_tokens"] == run["asked_output_tokens"] == 12 * 16
        assert all(_ordered(s[k]) for k in ("ttft", "tpot", "itl", "e2e"))
        assert s["output_throughput"] > 0 and 0 <= s["goodput"]["requests"] <= 12
        # 32 of each 64-token prompt are shared: 2 of its 4 blocks hit for all but the first request
        assert run["prefix_cache"]["queried_tokens"] == 12 * 64
        assert 0 < run["prefix_cache"]["hit_rate"] <= 0.5
    assert [Path(p).name for p in report["plots"]] == ["serve_cdf.png", "serve_sweep.png"]
    assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in report["plots"])


def test_prompts_without_shared_prefixes_hit_nothing(gateway_url, tmp_path):
    args = ["bench", "serve", "--url", gateway_url, "--num-prompts", "4", "--input-len", "48", "--output-len", "3",
            "--concurrency", "2", "--seed", "99", "--out", str(tmp_path)]
    assert main(args) == 0
    run = json.loads((tmp_path / "serve.json").read_text())["runs"][0]
    assert run["prefix_cache"]["hit_rate"] == 0.0 and run["summary"]["output_tokens"] == 12


def test_trace_scaling_keeps_the_block_structure():
    rows = [{"timestamp": 0, "input_length": 1100, "output_length": 64, "hash_ids": [7, 8, 9]},
            {"timestamp": 500, "input_length": 1024, "output_length": 3, "hash_ids": [7, 8]},
            {"timestamp": 1500, "input_length": 600, "output_length": 32, "hash_ids": [5, 8]}]
    a, b, c = workload.mooncake(rows, scale=32, vocab=1000, time_scale=2.0)
    assert (len(a.prompt), len(b.prompt), len(c.prompt)) == (34, 32, 18)
    assert a.prompt[:32] == b.prompt and a.prompt[16:18] == c.prompt[16:]  # equal ids, equal blocks
    assert a.prompt[:16] != c.prompt[:16]
    assert (a.output_len, b.output_len, c.output_len) == (2, 1, 1)
    assert (a.arrival_s, b.arrival_s, c.arrival_s) == (0.0, 1.0, 3.0)
    assert (a.block_ids, b.block_ids, c.block_ids) == ((7, 8, 9), (7, 8), (5, 8))
    reuse = workload.trace_reuse([a, b, c], 16)
    assert reuse.block_reuse == pytest.approx(3 / 7)  # 7, 8 again in row 2; 8 again in row 3
    assert reuse.prefix_reuse == pytest.approx(32 / (34 + 32 + 18))  # row 3's 8 follows a new block
    short = workload.mooncake(rows, scale=32, vocab=1000, max_len=20)  # prompt + output fit 20 tokens
    assert [len(r.prompt) + r.output_len for r in short] == [20, 20, 19] and short[0].block_ids == (7, 8)


def test_synthetic_prompts_share_exactly_the_asked_prefix():
    reqs = workload.synthetic(5, 40, 7, 0.25, vocab=50, seed=1)
    assert all(r.prompt[:10] == reqs[0].prompt[:10] and len(r.prompt) == 40 for r in reqs)
    assert len({tuple(r.prompt[10:]) for r in reqs}) == 5 and all(3 <= t < 50 for r in reqs for t in r.prompt)


def test_percentiles_interpolate_like_numpy():
    values = [0.4, 0.1, 0.3, 0.2]
    assert percentile(values, 50) == pytest.approx(0.25) and percentile(values, 99) == pytest.approx(0.397)


def test_open_loop_arrivals_have_the_asked_rate_and_burstiness():
    reqs = [workload.BenchRequest([5], 1)] * 4000
    poisson = arrival_times(len(reqs), LoadShape(rate=8.0, seed=3), reqs)
    bursty = arrival_times(len(reqs), LoadShape(rate=8.0, burstiness=0.25, seed=3), reqs)
    gaps = [[b - a for a, b in zip(t, t[1:])] for t in (poisson, bursty)]
    means = [sum(g) / len(g) for g in gaps]
    cv = [(sum((x - m) ** 2 for x in g) / len(g)) ** 0.5 / m for g, m in zip(gaps, means)]
    assert means == [pytest.approx(1 / 8, rel=0.06)] * 2  # same rate
    assert cv[0] == pytest.approx(1.0, rel=0.08) and cv[1] == pytest.approx(2.0, rel=0.1)  # gamma: cv = 1/sqrt(k)
    assert arrival_times(3, LoadShape(concurrency=2), reqs[:3]) == [0.0, 0.0, 0.0]
