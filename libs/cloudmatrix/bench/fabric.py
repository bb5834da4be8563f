"""`cmx bench fabric`: raw gRPC ping-pong, dispatch + combine rounds through a real ub_fabric
process at EP2/4/8, and the modeled 910C figures next to the paper's table."""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from cloudmatrix.bench.pingpong import grpc_pingpong_s
from cloudmatrix.bench.timing import write_report
from cloudmatrix.costmodel.ub import (
    modeled_dispatch_combine,
    paper_dispatch_combine_table,
)
from cloudmatrix.fabric.link import FabricLink
from cloudmatrix.launcher.processes import spawn, stop_all, wait_healthy
from cloudmatrix.launcher.topology import ProcessSpec
from cloudmatrix.moe.dispatch import TokenRows
from cloudmatrix.rpc.channel import health_check_sync

MAX_MESSAGE = 256 * 2**20


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("fabric", help="gRPC ping-pong, dispatch/combine rounds via ub_fabric, modeled UB")
    parser.add_argument("--quick", action="store_true", help="EP2/EP4, smaller hidden size, fewer rounds")
    parser.add_argument("--hidden", type=int, default=7168, help="hidden size of the tokens (DeepSeek-V3: 7168)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="runs/bench")
    parser.set_defaults(handler=run)


@contextlib.contextmanager
def fabric_process(run_dir: Path):
    spec = ProcessSpec("bench-fabric", "ub_fabric", "127.0.0.1", 0, None,
                       (f"server.max_message_bytes={MAX_MESSAGE}",))
    proc, record = spawn(spec, run_dir)
    try:
        wait_healthy([(proc, record)], health_check_sync, timeout_s=60)
        yield record.address
    finally:
        stop_all([record], grace_s=5)
        proc.wait(timeout=10)


def _rows(tokens: int, top_k: int, hidden: int, dst: int, ep: int, kind: str) -> TokenRows:
    """This die's rows for one peer: tokens x top_k pairs spread evenly over the ep dies."""
    n = tokens * top_k // ep + (1 if dst < tokens * top_k % ep else 0)
    hidden_t = torch.randint(-127, 128, (n, hidden), dtype=torch.int8) if kind == "dispatch" \
        else torch.randn(n, hidden).to(torch.bfloat16)
    scales = torch.rand(n) if kind == "dispatch" else None
    return TokenRows(hidden_t, torch.arange(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32), torch.rand(n),
                     scales)


def _die_rounds(link: FabricLink, tokens: int, top_k: int, hidden: int, rounds: int) -> list:
    ep = link.num_dies
    payload = {kind: {d: _rows(tokens, top_k, hidden, d, ep, kind) for d in range(ep)} for kind in ("dispatch", "combine")}
    for step in range(rounds + 1):  # the first is warm-up
        link.begin_step(step, 0)
        link.all_to_all("dispatch", 0, payload["dispatch"])
        link.all_to_all("combine", 0, payload["combine"])
    return link.traffic  # the last step's rounds (this thread's)


def measure_rounds(fabric: str, ep: int, tokens: int, top_k: int, hidden: int, rounds: int) -> dict:
    links = [FabricLink(fabric, d, ep, f"bench-ep{ep}-b{tokens}", 60.0, MAX_MESSAGE) for d in range(ep)]
    with ThreadPoolExecutor(ep) as pool:
        list(pool.map(lambda link: link.connect(60.0), links))
        start = time.perf_counter()
        traffic = list(pool.map(lambda link: _die_rounds(link, tokens, top_k, hidden, rounds), links))
        elapsed = (time.perf_counter() - start) / (rounds + 1)
    for link in links:
        link.close()
    sent = sum(sum(r.sent.values()) for link_traffic in traffic for r in link_traffic)
    return {"ep": ep, "tokens_per_die": tokens, "round_pair_s": elapsed, "bytes_per_round_pair": sent,
            "throughput_gbps": sent / elapsed / 1e9}


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    eps, batches = ((2, 4), (1, 32)) if args.quick else ((2, 4, 8), (1, 32, 128))
    hidden = min(args.hidden, 1024) if args.quick else args.hidden
    rounds = 20 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp, fabric_process(Path(tmp)) as fabric:
        pingpong = grpc_pingpong_s(200 if not args.quick else 50)
        measured = [measure_rounds(fabric, ep, b, args.top_k, hidden, rounds) for ep in eps for b in batches]
    modeled = [dict(op=r.op, ep=r.ep, latency_us=r.latency_us, bandwidth_gbps=r.bandwidth_gbps)
               for ep in (8, 256) for r in modeled_dispatch_combine(ep)]
    paper = [dict(op=r.op, ep=r.ep, latency_us=r.latency_us, bandwidth_gbps=r.bandwidth_gbps)
             for r in paper_dispatch_combine_table()]
    for r in measured:
        r["x_pingpong"] = r["round_pair_s"] / pingpong
    report = {"hidden": hidden, "top_k": args.top_k, "grpc_pingpong_rtt_s": pingpong, "rounds": measured,
              "modeled_910c": modeled, "paper": paper}
    path = write_report(args.out, "fabric", report)
    _print(report)
    print(f"\nthreads: 1 per die link; JSON: {path}")
    return 0


def _print(report: dict) -> None:
    print(f"raw gRPC bidi ping-pong round trip on this machine: {report['grpc_pingpong_rtt_s'] * 1e6:.0f} us")
    print(f"\ndispatch (int8) + combine (bf16) through ub_fabric, hidden {report['hidden']}, top-{report['top_k']}:")
    print(f"{'EP':>4} {'tokens/die':>10} {'latency':>12} {'x ping-pong':>12} {'MB/round':>10} {'GB/s':>8}")
    for r in report["rounds"]:
        print(f"{r['ep']:>4} {r['tokens_per_die']:>10} {r['round_pair_s'] * 1e3:>10.2f}ms {r['x_pingpong']:>11.1f}x "
              f"{r['bytes_per_round_pair'] / 1e6:>10.2f} {r['throughput_gbps']:>8.3f}")
    print("\nmodeled CloudMatrix384 (batch 128 per rank, hidden 7168, top-8) vs the paper:")
    print(f"{'op':<9} {'EP':>4} {'modeled':>10} {'paper':>8} {'modeled BW':>11} {'paper BW':>9}")
    for m, p in zip(report["modeled_910c"], sorted(report["paper"], key=lambda r: (r["ep"], r["op"] != "dispatch"))):
        print(f"{m['op']:<9} {m['ep']:>4} {m['latency_us']:>8.1f}us {p['latency_us']:>6.0f}us "
              f"{m['bandwidth_gbps']:>9.1f}GB/s {p['bandwidth_gbps']:>6.0f}GB/s")
