"""`cmx simulate --trace FILE` / `--synthetic poisson|gamma`: a request stream replayed in
virtual time through the serving system's own schedulers on a modeled deployment
(docs/simulator.md, "Request-level simulation")."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from cloudmatrix.costmodel.ops import DEEPSEEK_V3
from cloudmatrix.model.config import ModelConfig, load_config
from cloudmatrix.model.presets import PRESETS
from cloudmatrix.simulator.planning import parse_duration_s
from cloudmatrix.simulator.replay.engine import Deployment, Replay
from cloudmatrix.simulator.replay.report import Slo, print_summary, summary
from cloudmatrix.simulator.replay.workload import TraceRequest, read_mooncake, synthetic

PAPER = Deployment()


def register(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("request-level replay (--trace or --synthetic)")
    g.add_argument("--trace", default=None, metavar="JSONL", help="replay a Mooncake trace (traces/ in the repo)")
    g.add_argument("--synthetic", choices=("poisson", "gamma"), default=None,
                   help="replay synthetic arrivals at --rate requests/s of --prompt + --output tokens")
    g.add_argument("--count", type=int, default=1000, help="synthetic: requests")
    g.add_argument("--burstiness", type=float, default=0.5, help="synthetic gamma: shape (1 = Poisson)")
    g.add_argument("--lengths", choices=("fixed", "uniform", "exponential"), default="fixed",
                   help="synthetic: prompt and output lengths around --prompt / --output")
    g.add_argument("--rate-scale", type=float, default=1.0, help="trace: arrivals this many times as fast")
    g.add_argument("--limit", type=int, default=0, help="trace: the first N requests (0: all)")
    g.add_argument("--scale", type=int, default=1,
                   help="trace: lengths and 512-token blocks divided by this (for small --model presets)")
    g.add_argument("--slo", default="ttft=2s,tpot=50ms", help="goodput SLO, e.g. ttft=2s,tpot=50ms")
    g.add_argument("--prefill-instances", type=int, default=PAPER.prefill_instances)
    g.add_argument("--prefill-dies", type=int, default=PAPER.prefill_dies, help="dies per prefill instance")
    g.add_argument("--decode-instances", type=int, default=PAPER.decode_instances)
    g.add_argument("--decode-dies", type=int, default=PAPER.decode_dies, help="dies per decode instance (EP)")
    g.add_argument("--pool-gib", type=float, default=PAPER.pool_gib, help="context-cache pool capacity")
    g.add_argument("--kv-gib-per-die", type=float, default=PAPER.kv_gib_per_die, help="HBM for KV per die")
    g.add_argument("--no-context-cache", action="store_true", help="compute every prompt token")
    g.add_argument("--seed", type=int, default=0, help="synthetic arrivals and MTP acceptance draws")
    g.add_argument("--model", default="deepseek-v3",
                   help="the simulated model: deepseek-v3 (R1's dimensions), a preset (tiny, ...) or a "
                        "checkpoint directory / config.json")
    g.add_argument("--out", default="runs/simulate", metavar="DIR",
                   help="replays write <name>.json and <name>.png here (unless --json / --plot say where)")
    g.add_argument("--crosscheck", action="store_true",
                   help="the replay against the analytic decode model and the paper's context-caching rows")


def parse_slo(text: str) -> Slo:
    parts = dict(p.split("=", 1) for p in text.split(",") if "=" in p)
    unknown = set(parts) - {"ttft", "tpot"}
    if unknown or not parts:
        raise ValueError(f"slo: expected ttft=DURATION,tpot=DURATION, got {text!r}")
    return Slo(parse_duration_s(parts.get("ttft", "2s")), parse_duration_s(parts.get("tpot", "50ms")))


def deployment(args: argparse.Namespace) -> Deployment:
    return Deployment(prefill_instances=args.prefill_instances, prefill_dies=args.prefill_dies,
                      decode_instances=args.decode_instances, decode_dies=args.decode_dies, mtp=not args.no_mtp,
                      acceptance=args.acceptance, int8=not args.no_int8, microbatches=args.microbatches,
                      pool_gib=args.pool_gib, kv_gib_per_die=args.kv_gib_per_die,
                      context_cache=not args.no_context_cache, hardware=args.hardware)


def model_config(name: str) -> ModelConfig:
    if name == "deepseek-v3":
        return DEEPSEEK_V3
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name)
    if path.is_file():
        return ModelConfig.from_dict(json.loads(path.read_text()))
    if path.is_dir():
        return load_config(path)
    raise ValueError(f"model: {name!r} is not deepseek-v3, a preset ({', '.join(PRESETS)}) or a config.json")


def workload(args: argparse.Namespace) -> list[TraceRequest]:
    if args.trace:
        return read_mooncake(args.trace, args.limit, args.rate_scale, args.scale)
    rate = args.rate if args.rate is not None else 1.0
    return synthetic(args.count, rate * args.rate_scale, args.prompt, args.output,
                     1.0 if args.synthetic == "poisson" else args.burstiness, args.seed, args.lengths)


def run(args: argparse.Namespace) -> dict:
    slo, requests = parse_slo(args.slo), workload(args)
    replay = Replay(requests, deployment(args), seed=args.seed, cfg=model_config(args.model))
    started = time.perf_counter()
    with tqdm(total=round(requests[-1].arrival_s), desc="simulated s", unit="s", leave=False, disable=None) as bar:
        def progress(now: float) -> None:
            if now - bar.n >= 1.0:
                bar.update(min(int(now - bar.n), max(0, bar.total - bar.n)))
        replay.run(progress)
    wall = time.perf_counter() - started
    result = summary(replay, slo) | {"wall_s": wall, "simulated_s_per_wall_s": replay.now / wall,
                                     "source": args.trace or f"synthetic {args.synthetic}"}
    print_summary(result)
    print(f"  {replay.now:,.0f} simulated s in {wall:.1f} wall s ({replay.now / wall:,.0f}x)")
    name = Path(args.trace).stem if args.trace else f"synthetic-{args.synthetic}"
    out = Path(args.out)
    if args.json is None:  # written by the caller when given
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"json: {out / f'{name}.json'}")
    plot = args.plot or str(out / f"{name}.png")
    Path(plot).parent.mkdir(parents=True, exist_ok=True)
    from cloudmatrix.simulator.replay.plots import plot_replay

    plot_replay(replay, plot)
    print(f"plot: {plot}")
    return result


def crosscheck() -> dict:
    from cloudmatrix.simulator.replay.crosscheck import context_cache, decode_steady_state

    a = decode_steady_state()
    print(f"(a) closed loop, {a['batch_per_die']} sequences per die on {a['dies']} dies, {a['prompt']} + "
          f"{a['output']} tokens: replay TPOT {a['replay_tpot_ms']:.2f} ms, analytic {a['analytic_tpot_ms']:.2f} ms "
          f"({a['error']:+.1%})")
    rows = [context_cache(r) for r in (0.5, 0.9)]
    for c in rows:
        print(f"(c) {c['reuse']:.0%} reuse: prefill throughput x{c['throughput_x']:.2f} (paper x"
              f"{c['paper_throughput_x']:.2f}), TTFT {c['ttft_change']:+.0%} (paper {c['paper_ttft_change']:+.0%})")
    return {"decode_steady_state": a, "context_cache": rows}
