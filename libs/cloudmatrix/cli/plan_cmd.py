"""`cmx plan`: the cheapest deployments (in NPUs) that serve a trace within an SLO, each found by
replaying the trace in virtual time (docs/simulator.md, "Planning a deployment")."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cloudmatrix.cli.simulate_trace import parse_slo
from cloudmatrix.simulator.replay.engine import Deployment
from cloudmatrix.simulator.replay.plan import Outcome, plan
from cloudmatrix.simulator.replay.workload import read_mooncake, synthetic


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("plan", help="the cheapest deployments (NPUs) that serve a trace within an SLO")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="a Mooncake JSONL trace (traces/ in the repo)")
    source.add_argument("--synthetic", type=float, metavar="RATE", help="Poisson arrivals at RATE requests/s")
    parser.add_argument("--count", type=int, default=1000, help="synthetic: requests")
    parser.add_argument("--prompt", type=int, default=4096, help="synthetic: prompt tokens")
    parser.add_argument("--output", type=int, default=256, help="synthetic: output tokens")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="trace: arrivals this many times as fast")
    parser.add_argument("--limit", type=int, default=0, help="trace: the first N requests (0: all)")
    parser.add_argument("--slo", default="ttft=2s,tpot=50ms", help="e.g. ttft=2s,tpot=50ms")
    parser.add_argument("--attainment", type=float, default=0.95,
                        help="share of requests that must meet both SLOs")
    parser.add_argument("--max-prefill-instances", type=int, default=16)
    parser.add_argument("--no-mtp", action="store_true")
    parser.add_argument("--top", type=int, default=6, help="deployments to print")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the ranking as JSON")
    parser.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    slo = parse_slo(args.slo)
    requests = (read_mooncake(args.trace, args.limit, args.rate_scale) if args.trace
                else synthetic(args.count, args.synthetic, args.prompt, args.output))
    base = Deployment(mtp=not args.no_mtp)
    print(f"{len(requests)} requests over {requests[-1].arrival_s:,.0f} s; SLO TTFT {slo.ttft_s * 1e3:g} ms, "
          f"TPOT {slo.tpot_s * 1e3:g} ms, for {args.attainment:.0%} of requests")

    def tried(o: Outcome) -> None:
        within = f"TTFT {o.ttft_share:.1%} (up to the first token)" if o.prefill_only else \
            f"TTFT {o.ttft_share:.1%}, TPOT {o.tpot_share:.1%}, both {o.share:.1%}"
        print(f"  tried {_name(o)}: {within} within the SLO", file=sys.stderr)

    result = plan(requests, slo, base, args.attainment, args.max_prefill_instances, on_outcome=tried)
    ranked = result.ranked
    print(f"{'deployment':<36} {'NPUs':>6} {'P:D':>9} {'TTFT p90':>10} {'TPOT p90':>10} {'within SLO':>11} "
          f"{'tok/s/NPU':>10}")
    for o in ranked[:args.top]:
        s = o.summary
        print(f"{_name(o):<36} {o.npus:>6g} {_ratio(o):>9} {s['ttft']['p90_ms']:>8.0f}ms {s['tpot']['p90_ms']:>8.1f}ms "
              f"{o.share:>10.1%} {s['throughput']['output_tokens_per_s_per_npu']:>10.1f}"
              + ("" if o.meets(args.attainment) else "  (misses)"))
    pick, check = result.pick, result.confirmed
    if args.json:
        Path(args.json).write_text(json.dumps({"slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
                                               "attainment": args.attainment,
                                               "pick": _as_dict(pick) if pick else None,
                                               "pick_replayed_share": check.share if check else None,
                                               "ranked": [_as_dict(o) for o in ranked]}, indent=2) + "\n")
    if pick is None:
        print("no deployment tried meets the SLO; raise --max-prefill-instances or loosen the SLO")
        return 1
    print(f"pick: {_name(pick)}, {pick.npus:g} NPUs ({_ratio(pick)} prefill:decode NPUs): {pick.share:.1%} of "
          f"requests within the SLO, {check.share:.1%} when replayed again with other MTP draws")
    return 0


def _name(o: Outcome) -> str:
    d = o.deployment
    return f"{d.prefill_instances} x {d.prefill_dies}-die prefill + {d.decode_instances} x {d.decode_dies}-die decode"


def _ratio(o: Outcome) -> str:
    d = o.deployment
    return f"{d.prefill_instances * d.prefill_dies // 2}:{d.decode_instances * d.decode_dies // 2}"


def _as_dict(o: Outcome) -> dict:
    return {"deployment": o.summary["deployment"], "npus": o.npus, "ttft_share": o.ttft_share,
            "tpot_share": o.tpot_share, "share": o.share, "summary": o.summary}
