"""`cmx simulate`: DeepSeek-R1 on CloudMatrix384 from the cost model's operators (docs/simulator.md).

    cmx simulate --paper                                # every headline row: paper, prediction, error
    cmx simulate --batch 64 --kv-len 8192 --no-mtp      # one decode configuration, with its breakdown
    cmx simulate --tpot-slo 30ms --prompt 4096 --output 256   # the largest batch within the SLO
    cmx simulate --phase prefill --reuse 0.5            # a prefill batch with a context-cache hit
    cmx simulate --rate 20 --prompt 4096 --output 256 --tpot-slo 50ms   # NPUs for a request rate
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from cloudmatrix.cli import simulate_report, simulate_trace
from cloudmatrix.simulator.calibration import FITTED
from cloudmatrix.simulator.decode import (
    DIES_PER_NPU,
    DecodeResult,
    DecodeSetup,
    largest_batch_within,
    paper_proportions,
    simulate_decode,
)
from cloudmatrix.simulator.paper import mean_kv_len
from cloudmatrix.simulator.planning import parse_duration_s, plan, prefill_setup_for
from cloudmatrix.simulator.prefill import PrefillResult, PrefillSetup, simulate_prefill

EFF = FITTED.efficiency()  # the operators' efficiencies with the calibrated constants


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("simulate", help="predict DeepSeek-R1 serving on CloudMatrix384 (the paper's tables, "
                                             "what-ifs, SLOs, NPU counts)")
    parser.add_argument("--paper", action="store_true", help="every headline row of the paper: paper, prediction, "
                                                             "error, training or held out, within the bound")
    parser.add_argument("--bands", action="store_true",
                        help="with --paper: each prediction's band over the calibrated constants' ranges")
    parser.add_argument("--validate", action="store_true",
                        help="the calibration: pre-registration, refit, held-out and leave-one-out errors, ranges")
    parser.add_argument("--sensitivity", action="store_true",
                        help="which calibrated constant moves which row (each at its bounds)")
    parser.add_argument("--phase", choices=("decode", "prefill"), default="decode", help="what to simulate")
    parser.add_argument("--hardware", choices=("cloudmatrix384", "h800", "h100"), default="cloudmatrix384",
                        help="h800 / h100: Hopper GPUs from their public operator figures (--batch is per GPU, "
                             "--dies the EP degree in GPUs)")
    parser.add_argument("--batch", type=int, default=96, help="decode: sequences per NPU (2 dies)")
    parser.add_argument("--kv-len", type=int, default=None,
                        help="decode: mean KV length (default: prompt + output / 2)")
    parser.add_argument("--prompt", type=int, default=4096, help="prompt tokens per request")
    parser.add_argument("--output", type=int, default=256, help="generated tokens per request")
    parser.add_argument("--dies", type=int, default=None,
                        help="EP degree: dies of one instance (default: 320 for decode, 32 for prefill)")
    parser.add_argument("--no-int8", action="store_true", help="BF16 GEMMs and dispatch instead of INT8")
    parser.add_argument("--no-mtp", action="store_true", help="decode without the MTP draft token")
    parser.add_argument("--acceptance", type=float, default=0.7, help="MTP draft acceptance rate")
    parser.add_argument("--microbatches", type=int, choices=(0, 1, 2), default=0,
                        help="1 = no overlap, 2 = attention and MoE of two microbatches overlap; decode 0 = the "
                             "faster of the two for each batch (prefill: 0 = 2)")
    parser.add_argument("--eplb", choices=("default", "perfect"), default="default",
                        help="expert placement: the default EPLB's calibrated residual, or perfect")
    parser.add_argument("--imbalance", type=float, default=None,
                        help="busiest expert die's tokens / the mean (overrides --eplb)")
    parser.add_argument("--reuse", type=float, default=0.0, help="prefill: share of each prompt in the context cache")
    parser.add_argument("--tokens-per-npu", type=int, default=16384, help="prefill: prompt tokens per NPU per batch")
    parser.add_argument("--tpot-slo", default=None, metavar="DURATION",
                        help="decode: find the largest batch whose TPOT meets this (30ms, 0.05s)")
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s: the NPUs prefill and decode need (with --tpot-slo, default 50ms)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON ('-': stdout)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="decode: throughput vs TPOT over batch sizes, MTP on and off, INT8 and BF16")
    simulate_trace.register(parser)
    parser.set_defaults(handler=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    if args.crosscheck:
        result = simulate_trace.crosscheck()
    elif args.trace or args.synthetic:
        result = simulate_trace.run(args)
        args.plot = None  # drawn by the replay
    elif args.validate:
        result = simulate_report.validate()
    elif args.sensitivity:
        result = simulate_report.sensitivity()
    elif args.paper:
        result = simulate_report.paper(args.bands)
    elif args.hardware != "cloudmatrix384":
        result = simulate_report.gpu(args)
    elif args.rate is not None:
        result = _plan(args)
    elif args.phase == "prefill":
        result = _prefill(args)
    else:
        result = _decode(args)
    if args.plot:
        _plot(args, args.plot)
    if args.json == "-":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _decode_base(args: argparse.Namespace) -> DecodeSetup:
    # another EP degree keeps the paper's proportions: a tenth of the dies for shared-expert
    # replicas and as many redundant copies (32 + 32 of 320)
    scaled = paper_proportions(args.dies) if args.dies else {}
    changes = {"int8": not args.no_int8, "mtp": not args.no_mtp, "acceptance": args.acceptance,
               "microbatches": args.microbatches} | scaled
    setup = DecodeSetup(batch_per_die=args.batch // DIES_PER_NPU,
                        kv_len=args.kv_len or mean_kv_len(args.prompt, args.output), **changes)
    imbalance = args.imbalance or (1.0 if args.eplb == "perfect" else FITTED.eplb_residual)
    return dataclasses.replace(setup, imbalance=imbalance, round_slowdown=FITTED.round_slowdown)


def _prefill_base(args: argparse.Namespace) -> PrefillSetup:
    changes = {"int8": not args.no_int8, "microbatches": args.microbatches or 2, "reuse": args.reuse,
               "tokens_per_die": args.tokens_per_npu // DIES_PER_NPU} | ({"dies": args.dies} if args.dies else {})
    setup = prefill_setup_for(args.prompt, PrefillSetup(**changes))
    imbalance = args.imbalance or (1.0 if args.eplb == "perfect" else FITTED.eplb_residual)
    return dataclasses.replace(setup, imbalance=imbalance)


def _decode(args: argparse.Namespace) -> dict:
    setup = _decode_base(args)
    if args.tpot_slo:
        slo = parse_duration_s(args.tpot_slo)
        result = largest_batch_within(slo, setup, eff=EFF)
        if result is None:
            raise ValueError(f"no batch meets a TPOT of {slo * 1e3:g} ms with this setup")
        print(f"largest batch within a TPOT of {slo * 1e3:g} ms "
              f"(prompt {args.prompt}, output {args.output}, mean KV {setup.kv_len}):")
    else:
        result = simulate_decode(setup, eff=EFF)
    _print_decode(result)
    return _decode_dict(result)


def _decode_dict(r: DecodeResult) -> dict:
    return {"setup": dataclasses.asdict(r.setup), "batch_per_npu": DIES_PER_NPU * r.setup.batch_per_die,
            "tpot_ms": r.tpot_s * 1e3, "step_ms": r.step_s * 1e3, "layer_us": r.layer_s * 1e6,
            "tokens_per_s_per_npu": r.tokens_per_s_per_npu, "tokens_per_s_per_tflops": r.tokens_per_s_per_tflops,
            "attention_us": {k: v * 1e6 for k, v in r.attention.breakdown().items()},
            "moe_us": {k: v * 1e6 for k, v in r.moe.breakdown().items()}}


def _print_decode(r: DecodeResult) -> None:
    s = r.setup
    print(f"decode, {s.dies} dies (EP{s.dies}), batch {DIES_PER_NPU * s.batch_per_die}/NPU "
          f"({s.batch_per_die} per die), KV {s.kv_len}, "
          f"{'INT8' if s.int8 else 'BF16'}, MTP {'on (acceptance %.2f)' % s.acceptance if s.mtp else 'off'}, "
          f"{s.microbatches} microbatch(es), expert imbalance {s.imbalance:.2f}")
    print(f"  TPOT {r.tpot_s * 1e3:.1f} ms (step {r.step_s * 1e3:.1f} ms, {s.tokens_per_step:.2f} tokens/step); "
          f"{r.tokens_per_s_per_npu:,.0f} tokens/s per NPU ({r.tokens_per_s_per_tflops:.2f} per TFLOPS); "
          f"MoE layer {r.layer_s * 1e6:,.0f} us")
    print("  one MoE layer, whole batch on a whole die (no overlap):")
    print("    " + r.attention.table().replace("\n", "\n    "))
    print("    " + r.moe.table().replace("\n", "\n    "))


def _prefill(args: argparse.Namespace) -> dict:
    r = simulate_prefill(_prefill_base(args), eff=EFF)
    _print_prefill(r)
    return _prefill_dict(r)


def _prefill_dict(r: PrefillResult) -> dict:
    return {"setup": dataclasses.asdict(r.setup), "batch_s": r.batch_s, "layer_ms": r.layer_s * 1e3,
            "cache_load_ms": r.cache_load_s * 1e3, "tokens_per_s_per_npu": r.tokens_per_s_per_npu,
            "tokens_per_s_per_tflops": r.tokens_per_s_per_tflops,
            "compute_us": {k: v * 1e6 for k, v in r.compute.breakdown().items()},
            "rounds_us": {k: v * 1e6 for k, v in r.rounds.breakdown().items()}}


def _print_prefill(r: PrefillResult) -> None:
    s = r.setup
    print(f"prefill, {s.dies} dies (EP{s.dies}), {s.sequences} x {s.prompt_len}-token prompts per die, "
          f"{s.reuse:.0%} from the context cache, {'INT8' if s.int8 else 'BF16'}, {s.microbatches} microbatch(es), "
          f"expert imbalance {s.imbalance:.2f}")
    print(f"  batch {r.batch_s:.2f} s (cache load {r.cache_load_s * 1e3:.1f} ms); {r.tokens_per_s_per_npu:,.0f} "
          f"tokens/s per NPU ({r.tokens_per_s_per_tflops:.2f} per TFLOPS); MoE layer {r.layer_s * 1e3:.1f} ms")
    print("    " + r.compute.table().replace("\n", "\n    "))
    print("    " + r.rounds.table().replace("\n", "\n    "))


def _plan(args: argparse.Namespace) -> dict:
    slo = parse_duration_s(args.tpot_slo or "50ms")
    p = plan(args.rate, args.prompt, args.output, slo, _decode_base(args), _prefill_base(args))
    d = p.as_dict()
    print(f"{args.rate:g} requests/s of {args.prompt} + {args.output} tokens, TPOT <= {slo * 1e3:g} ms:")
    print(f"  prefill: {d['prefill_tokens_per_s_per_npu']:,.0f} tokens/s per NPU -> {p.prefill_npus} NPUs "
          f"({p.prefill_instances} instance(s) of {p.prefill.setup.dies // DIES_PER_NPU} NPUs)")
    print(f"  decode: batch {d['decode_batch_per_npu']}/NPU, TPOT {d['decode_tpot_ms']:.1f} ms, "
          f"{d['decode_tokens_per_s_per_npu']:,.0f} tokens/s per NPU -> {p.decode_npus} NPUs "
          f"({p.decode_instances} instance(s) of {p.decode.setup.dies // DIES_PER_NPU} NPUs)")
    return d


def _plot(args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = _decode_base(args)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, changes in (("INT8, MTP", {}), ("INT8, no MTP", {"mtp": False}), ("BF16, MTP", {"int8": False})):
        points = [simulate_decode(dataclasses.replace(base, batch_per_die=b, **changes), eff=EFF)
                  for b in range(2, 129, 2)]
        ax.plot([p.tpot_s * 1e3 for p in points], [p.tokens_per_s_per_npu for p in points], label=label)
    ax.set(xlabel="TPOT (ms)", ylabel="tokens/s per NPU",
           title=f"DeepSeek-R1 decode on CloudMatrix384, EP{base.dies}, mean KV {base.kv_len} (modeled)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")
