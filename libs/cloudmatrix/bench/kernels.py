"""`cmx bench kernels`: INT8 GEMM vs fp32, PASA vs torch SDPA, paged MLA decode vs dense attention.

Every comparison is measured side by side in one run (interleaved, median of repeats).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from cloudmatrix.bench.mla_decode import bench_mla_decode
from cloudmatrix.bench.timing import time_interleaved, write_report
from cloudmatrix.kernels.pasa import flash_attention
from cloudmatrix.quant.primitives import (
    int8_matmul,
    quantize_tokens,
    quantize_weight,
    w8a8_linear,
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("kernels", help="INT8 GEMM, PASA and paged MLA decode against their baselines")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench", help="directory for kernels.json")
    parser.set_defaults(handler=run)


def bench_int8_linear(m: int, k: int, n: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5
    w_int8, w_scale = quantize_weight(w)
    x_int8, x_scale = quantize_tokens(x)
    times = time_interleaved({"fp32": lambda: F.linear(x, w), "int8": lambda: w8a8_linear(x, w_int8, w_scale),
                              "int8_gemm": lambda: int8_matmul(x_int8, w_int8)}, repeats)
    rel_err = ((w8a8_linear(x, w_int8, w_scale) - F.linear(x, w)).norm() / F.linear(x, w).norm()).item()
    return {"shape": {"M": m, "K": k, "N": n}, "fp32_s": times["fp32"], "int8_s": times["int8"],
            "int8_gemm_only_s": times["int8_gemm"], "speedup": times["fp32"] / times["int8"],
            "gemm_only_speedup": times["fp32"] / times["int8_gemm"], "int8_rel_l2_error": rel_err}


def bench_pasa(seq: int, heads: int, kv_heads: int, dim: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, heads, seq, dim, generator=gen)
    k, v = (torch.randn(1, kv_heads, seq, dim, generator=gen) for _ in range(2))
    scale = dim ** -0.5
    k_rep, v_rep = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    fns = {
        "sdpa_fp32": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale),
        "pasa": lambda: flash_attention(q, k, v, scale=scale, mode="pasa", causal=True),
        "pasa_hybrid": lambda: flash_attention(q, k, v, scale=scale, mode="pasa-hybrid", causal=True),
    }
    times = time_interleaved(fns, repeats)
    return {"shape": {"S": seq, "Hq": heads, "Hkv": kv_heads, "D": dim, "causal": True},
            **{f"{name}_s": t for name, t in times.items()},
            "pasa_over_sdpa": times["pasa"] / times["sdpa_fp32"],
            "pasa_hybrid_over_sdpa": times["pasa_hybrid"] / times["sdpa_fp32"]}


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10
    report = {
        "int8_linear": bench_int8_linear(256, 2048, 2048, repeats) if not args.quick
        else bench_int8_linear(64, 512, 512, repeats),
        "pasa_attention": bench_pasa(1024 if not args.quick else 256, 8, 2, 128, max(2, repeats // 3)),
        "mla_decode": bench_mla_decode(batch=8, context=1024 if not args.quick else 128, repeats=repeats),
    }
    path = write_report(args.out, "kernels", report)
    _print(report)
    print(f"\nthreads: {args.threads}; JSON: {path}")
    return 0


def _print(report: dict) -> None:
    i8, pasa, mla = report["int8_linear"], report["pasa_attention"], report["mla_decode"]
    print(f"{'comparison':<44} {'baseline':>12} {'candidate':>12} {'ratio':>8}")
    print(f"{'INT8 W8A8 linear vs fp32 F.linear ' + str(tuple(i8['shape'].values())):<44} "
          f"{i8['fp32_s'] * 1e3:>10.2f}ms {i8['int8_s'] * 1e3:>10.2f}ms {i8['speedup']:>7.2f}x faster")
    print(f"{'  of which the int8 GEMM alone (torch._int_mm)':<44} {i8['fp32_s'] * 1e3:>10.2f}ms "
          f"{i8['int8_gemm_only_s'] * 1e3:>10.2f}ms {i8['gemm_only_speedup']:>7.2f}x faster")
    for mode in ("pasa", "pasa_hybrid"):
        print(f"{mode + ' vs SDPA fp32, S=' + str(pasa['shape']['S']):<44} {pasa['sdpa_fp32_s'] * 1e3:>10.2f}ms "
              f"{pasa[mode + '_s'] * 1e3:>10.2f}ms {pasa[mode + '_over_sdpa']:>7.2f}x slower")
    print(f"{'MLA decode: paged absorbed vs dense expanded':<44} {mla['dense_expanded_s'] * 1e3:>10.2f}ms "
          f"{mla['paged_absorbed_s'] * 1e3:>10.2f}ms {mla['speedup']:>7.2f}x faster")
