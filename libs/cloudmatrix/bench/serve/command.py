"""`cmx bench serve`: load a running gateway the way vLLM's ``bench serve`` does and report
TTFT / TPOT / ITL / end-to-end percentiles, throughput, goodput and the context-cache hit rate;
JSON with the configuration and machine facts, PNG plots."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import random
import sys
from pathlib import Path

from cloudmatrix.bench.cpu import TopologyProcesses, cpu_split, describe
from cloudmatrix.bench.serve import plots, workload
from cloudmatrix.bench.serve.runner import LoadShape, run_load
from cloudmatrix.bench.serve.stats import (
    CACHE_SERIES,
    hit_rate,
    scrape,
    step_breakdown,
    step_snapshot,
    summarize,
)
from cloudmatrix.bench.timing import apply_quick, write_report
from cloudmatrix.demo import gateway_url, get_json
from cloudmatrix.launcher.processes import load_state

QUICK = {"num_prompts": 12, "input_len": 64, "output_len": 16, "shared_prefix": 0.5, "concurrency": "1,4"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="load a running gateway: latency percentiles, throughput, goodput, cache hits")
    p.add_argument("--url", help="gateway base URL (default: the gateway `cmx up` started in --run-dir)")
    p.add_argument("--run-dir", default="runs/local")
    p.add_argument("--model", help="model id (default: the gateway's first)")
    p.add_argument("--quick", action="store_true", help="a small synthetic sweep (concurrency 1 and 4), < 2 min")
    p.add_argument("--concurrency", default="8", help="closed loop: one value or a comma-separated sweep")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s (overrides --concurrency)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1 = Poisson)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--shared-prefix", type=float, default=0.0, help="fraction of every prompt that is shared")
    p.add_argument("--trace", help="replay a Mooncake JSONL trace (timestamps, lengths, hash_ids)")
    p.add_argument("--scale", type=int, default=32, help="trace: lengths and 512-token blocks divided by this")
    p.add_argument("--limit", type=int, default=200, help="trace: first N requests")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace: arrival gaps multiplied by this")
    p.add_argument("--max-output", type=int, default=0, help="trace: cap output tokens (0 = as scaled)")
    p.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn from [3, vocab)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=250.0)
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    p.add_argument("--seed", type=int, help="prompt seed (default: a fresh one, so the context cache starts cold; "
                                            "recorded in the JSON)")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    apply_quick(args, QUICK)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    url = args.url or gateway_url(Path(args.run_dir))
    served = get_json(f"{url}/v1/models")["data"]
    model = args.model or served[0]["id"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, trace_info = [], None
    if args.trace:
        rows = workload.read_trace(args.trace, args.limit)
        context = next((m.get("max_model_len", 0) for m in served if m["id"] == model), 0)
        requests = workload.mooncake(rows, args.scale, args.vocab, args.time_scale, args.max_output, context,
                                     args.seed)
        block = workload.MOONCAKE_BLOCK_TOKENS // args.scale
        cut = sum(len(r.prompt) < max(1, row["input_length"] // args.scale) for r, row in zip(requests, rows))
        trace_info = {"path": str(args.trace), "requests": len(rows), "scale": args.scale, "block_tokens": block,
                      "prompts_cut_to_context": cut, "context": context,
                      **dataclasses.asdict(workload.trace_reuse(requests, block))}
        runs.append(_measure(url, model, requests, LoadShape(trace=True), args, "trace"))
    else:
        shapes = [LoadShape(rate=args.rate, burstiness=args.burstiness, seed=args.seed)] if args.rate else \
            [LoadShape(concurrency=int(c)) for c in str(args.concurrency).split(",")]
        for i, shape in enumerate(shapes):  # fresh prompts per point: hits come from the shared prefix only
            requests = workload.synthetic(args.num_prompts, args.input_len, args.output_len, args.shared_prefix,
                                          args.vocab, seed=args.seed + i)
            label = f"rate {shape.rate}" if shape.rate else f"concurrency {shape.concurrency}"
            runs.append(_measure(url, model, requests, shape, args, label))
    report = {"config": {**vars(args), "handler": None, "url": url, "model": model},
              "machine": _machine(), "trace": trace_info,
              "runs": [{k: v for k, v in r.items() if k != "results"} for r in runs]}
    report["plots"] = _plots(runs, out)
    path = write_report(out, "serve", report)
    _print(report)
    print(f"\nclient: 1 process, asyncio; JSON: {path}; plots: {', '.join(report['plots'])}")
    return 0 if all(r["summary"]["failed"] == 0 for r in runs) else 1


def _measure(url: str, model: str, requests, shape: LoadShape, args, label: str) -> dict:
    decode, processes = _decode_metrics(args), _processes(args)
    before, steps = scrape(url, CACHE_SERIES), step_snapshot(decode) if decode else None
    cpu_before = processes.snapshot() if processes else None
    results, elapsed = asyncio.run(run_load(url, model, requests, shape, args.timeout_s, label))
    cpu_after = processes.snapshot() if processes else None
    cache = hit_rate(before, scrape(url, CACHE_SERIES))
    summary = summarize(results, elapsed, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    cpu = cpu_split(processes.kinds, cpu_before, cpu_after, summary["output_tokens"]) if processes else None
    return {"label": label, "load": shape.describe(), "summary": summary, "prefix_cache": cache,
            "decode_steps": step_breakdown(steps, step_snapshot(decode)) if decode else None, "cpu": cpu,
            "asked_output_tokens": sum(r.output_len for r in requests), "results": results}


def _state(args) -> Path | None:
    """The state file of the topology `cmx up` started in --run-dir, when --url is not given."""
    state = Path(args.run_dir) / "state.json"
    return None if args.url or not state.exists() else state


def _decode_metrics(args) -> str:
    """The /metrics URL of the decode instance `cmx up` started in --run-dir; "" without one."""
    if _state(args) is None:
        return ""
    decode = [r for r in load_state(Path(args.run_dir)) if r.service == "decode" and r.metrics_port]
    return f"http://127.0.0.1:{decode[0].metrics_port}" if decode else ""


def _processes(args) -> TopologyProcesses | None:
    """The topology's processes by kind, for the CPU split (only on this machine: /proc)."""
    return TopologyProcesses.from_run_dir(Path(args.run_dir)) if _state(args) else None


def _plots(runs: list[dict], out: Path) -> list[str]:
    paths = [plots.cdf_plot({r["label"]: r["results"] for r in runs}, out / "serve_cdf.png")]
    splits = {r["label"]: {k: v["cpu_s_per_token"] * 1e3 for k, v in r["cpu"]["kinds"].items()} for r in runs if r["cpu"]}
    if splits:
        paths.append(plots.cpu_split_plot(splits, out / "serve_cpu.png"))
    if len(runs) > 1:
        points = [(r["label"], r["summary"]["tpot"]["p50_ms"], r["summary"]["output_throughput"]) for r in runs]
        paths.append(plots.sweep_plot(points, out / "serve_sweep.png"))
    return [str(p) for p in paths]


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": sys.version.split()[0]}


def _print(report: dict) -> None:
    head = f"{'run':<16} {'req':>4} {'fail':>4} {'out tok/s':>9} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>17} " \
           f"{'ITL p50 ms':>10} {'goodput r/s':>11} {'hit rate':>8}"
    print(head)
    for r in report["runs"]:
        s = r["summary"]
        print(f"{r['label']:<16} {s['requests']:>4} {s['failed']:>4} {s['output_throughput']:>9.1f} "
              f"{s['ttft']['p50_ms']:>8.0f}/{s['ttft']['p99_ms']:<8.0f} "
              f"{s['tpot']['p50_ms']:>8.1f}/{s['tpot']['p99_ms']:<8.1f} "
              f"{s['itl']['p50_ms']:>10.1f} {s['goodput']['request_throughput']:>11.2f} "
              f"{r['prefix_cache']['hit_rate']:>8.1%}")
    for r in report["runs"]:
        d = r.get("decode_steps")
        if d and d.get("steps"):
            phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted(d["die_phase_ms_per_step"].items()))
            print(f"{r['label']}: decode {d['steps']} steps, {d['step_ms']:.1f} ms and {d['sequences_per_step']:.1f} "
                  f"sequences a step; dies per step (ms): {phases}")
            if "speculation" in d:
                s = d["speculation"]
                print(f"{r['label']}: MTP drafts {s['drafts']}, accepted {s['accepted_tokens']} "
                      f"(acceptance rate {s['acceptance_rate']:.3f}, mean acceptance length "
                      f"{s['mean_acceptance_length']:.2f} tokens per verifying step)")
    for r in report["runs"]:
        if r.get("cpu"):
            print(f"{r['label']}: {describe(r['cpu'])}")
    if report["trace"]:
        t = report["trace"]
        print(f"trace {t['path']}: {t['requests']} requests scaled 1/{t['scale']} ({t['block_tokens']}-token blocks, "
              f"{t['prompts_cut_to_context']} prompts cut to the {t['context']}-token context); its own reuse as "
              f"sent: {t['block_reuse']:.1%} of blocks, {t['prefix_reuse']:.1%} of prompt tokens in a reused prefix")
