"""`cmx bench compare`: one command, one checkpoint, the same prompts and output lengths through
(a) Hugging Face transformers ``generate`` with static batching, (b) this project's in-process
engine (the instance scheduler over a local die: continuous batching, no RPC) and (c) the
distributed suite on the default topology, brought up by the command in fp32 and int8-pasa. With a
checkpoint that has an MTP module (``--checkpoint models/cmx-tiny-py``), (b) and (c) run with MTP
speculative decoding off and on (systems ``*_mtp``), each row with its tokens per decode step.

(a) and (b) each run in a process of their own with the machine's cores (``--threads``), and again
with one thread (rows ``*_1t``), before any topology is up; then each suite topology runs alone:
up, its repeats, down. Every system first serves one untimed warm-up batch of the same shape
(other prompts) in the process or topology it is then timed in, unless ``--no-warmup``: the
numbers are of a warm system, not of its first requests. Every row reports the CPU-seconds it spent per output token: its own
process for (a) and (b), every process of the topology by kind for (c) (bench/cpu.py). Each
number is the median over repeats; ratios are to (a) with all cores."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from cloudmatrix.bench.compare_child import run_child
from cloudmatrix.bench.compare_systems import suite
from cloudmatrix.bench.cpu import TopologyProcesses, describe, kind_order
from cloudmatrix.bench.serve import plots, workload
from cloudmatrix.bench.timing import apply_quick, write_report
from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.topology import parse_topology
from cloudmatrix.model.config import load_config
from cloudmatrix.model.presets import create_checkpoint

QUICK = {"requests": 8, "input_len": 64, "output_len": 16, "repeats": 2}
PRECISIONS = ("fp32", "int8-pasa")
METRICS = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "cpu_s_per_token")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="HF transformers vs the in-process engine vs the suite (fp32, int8-pasa)")
    p.add_argument("--quick", action="store_true", help="8 requests of 64 + 16 tokens, 2 repeats")
    p.add_argument("--requests", type=int, default=32, help="all sent at once to each system")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="time each system's first requests too (default: one untimed warm-up batch first)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of transformers and the in-process engine (0 = the machine's cores); "
                        "both also run with 1 thread")
    p.add_argument("--hf-batch", type=int, default=0, help="static batch size for transformers (0 = all requests)")
    p.add_argument("--topology", default="topologies/local.yaml")
    p.add_argument("--preset", default="tiny", help="random-weight model preset (without --checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="a trained checkpoint instead (e.g. models/cmx-tiny-py: with its MTP module, MTP off and on)")
    p.add_argument("--held-out", action="store_true",
                   help="prompts from the corpus's test split (with a trained --checkpoint) instead of random ids")
    p.add_argument("--mtp", choices=("auto", "off", "on", "both"), default="auto",
                   help="speculative decoding with the MTP module (auto: both when the checkpoint has one)")
    p.add_argument("--plot", action="store_true", help="also draw the CPU split per system (compare_cpu.png)")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    apply_quick(args, QUICK)
    torch.set_num_threads(1)
    cores = args.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="cmx-compare-") as tmp:
        tmp = Path(tmp)
        float_ckpt, int8_ckpt = _checkpoints(tmp, args.preset, args.checkpoint)
        cfg = load_config(float_ckpt)
        modes = _mtp_modes(args.mtp, cfg.num_nextn_predict_layers)
        sets = [workload.held_out(float_ckpt, args.requests, args.input_len, args.output_len, repeat)
                if args.held_out else
                workload.synthetic(args.requests, args.input_len, args.output_len, 0.0, cfg.vocab_size, seed=repeat)
                for repeat in range(args.repeats + 1)]  # the last: the warm-up batch
        prompt_sets, warmup = sets[:-1], sets[-1] if args.warmup else []
        samples = _in_process_systems(args, float_ckpt, modes, cores, prompt_sets, warmup)  # nothing else is up
        layouts = {name: {"threads": runs[0]["threads"], "processes": 1, "allocator": runs[0]["allocator"],
                          "allocator_env": runs[0]["env"], "mallopt": runs[0]["mallopt"]}
                   for name, runs in samples.items()}
        for mtp in modes:
            for ckpt, precision in zip((float_ckpt, int8_ckpt), PRECISIONS):
                name = _name(f"suite_{precision.replace('-', '_')}", mtp)
                samples[name], layouts[name] = _suite_system(args, ckpt, precision, mtp, tmp / name, prompt_sets,
                                                             warmup)
    report = _report(args, samples, layouts)
    if args.plot:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        report["plots"] = [str(plots.cpu_split_plot(_cpu_bars(report["rows"]), Path(args.out) / "compare_cpu.png"))]
    path = write_report(args.out, "compare", report)
    _print(report)
    print(f"\nthreads: transformers and the in-process engine {cores} (rows *_1t: 1), every suite process 1; "
          f"JSON: {path}")
    return 0


def _in_process_systems(args, checkpoint: Path, modes: list[bool], cores: int, prompt_sets: list,
                        warmup: list) -> dict[str, list[dict]]:
    """transformers and the in-process engine, each in its own process, all cores then 1 thread;
    each process serves the warm-up prompts before the timed ones."""
    prompts = [[p.prompt for p in prompt_set] for prompt_set in prompt_sets]
    warm = [p.prompt for p in warmup]
    systems = [("hf_static", {"system": "hf", "mtp": False})]
    systems += [(_name("in_process", mtp), {"system": "in_process", "mtp": mtp}) for mtp in modes]
    samples = {}
    for name, spec in systems:
        for threads in dict.fromkeys((cores, 1)):
            label = name if threads == cores else f"{name}_1t"
            samples[label] = [run_child({**spec, "checkpoint": str(checkpoint), "threads": threads,
                                         "hf_batch": args.hf_batch, "prompts": p, "warmup": warm,
                                         "output_len": args.output_len})
                              for p in prompts]
    return samples


def _suite_system(args, checkpoint: Path, precision: str, mtp: bool, run_dir: Path,
                  prompt_sets: list, warmup: list) -> tuple[list[dict], dict]:
    """One suite topology alone: up, the warm-up prompts (untimed), every prompt set through it
    with its CPU split, down."""
    records = bring_up(_topology(args.topology, checkpoint, precision, mtp), run_dir.resolve(), 180.0)
    try:
        processes = TopologyProcesses.from_run_dir(run_dir)
        warmed = len(warmup) and suite(run_dir, _decode_metrics(records), warmup, processes)["requests"]
        runs = [suite(run_dir, _decode_metrics(records), prompts, processes) | {"warmup_requests": warmed}
                for prompts in prompt_sets]
        settings = processes.allocator()
        return runs, {"threads": 1, "processes": processes.layout(), "allocator": settings["allocator"],
                      "allocator_env": settings["env"], "mallopt": settings["mallopt"]}
    finally:
        bring_down(run_dir.resolve(), 10.0)


def _decode_metrics(records) -> str:
    decode = next(r for r in records if r.service == "decode")
    return f"http://127.0.0.1:{decode.metrics_port}"


def _checkpoints(tmp: Path, preset: str, checkpoint: str | None) -> tuple[Path, Path]:
    from cloudmatrix.cli.main import main as cmx

    name = Path(checkpoint).name if checkpoint else preset
    float_ckpt = Path(checkpoint).resolve() if checkpoint else create_checkpoint(preset, tmp / "checkpoints" / preset,
                                                                                 seed=0)
    int8_ckpt = tmp / "checkpoints" / f"{name}-int8"
    if cmx(["quantize", "--checkpoint", str(float_ckpt), "--out", str(int8_ckpt)]) != 0:
        raise RuntimeError("quantizing the checkpoint failed")
    return Path(float_ckpt), int8_ckpt


def _mtp_modes(choice: str, has_mtp: int) -> list[bool]:
    if choice in ("on", "both") and not has_mtp:
        raise ValueError("--mtp on/both: the checkpoint has no MTP module (num_nextn_predict_layers 0)")
    return {"off": [False], "on": [True], "both": [False, True]}.get(choice, [False, True] if has_mtp else [False])


def _name(system: str, mtp: bool) -> str:
    return f"{system}_mtp" if mtp else system


def _topology(path: str, checkpoint: Path, precision: str, mtp: bool | None = None):
    """The topology file with every instance serving ``checkpoint`` in ``precision``, with
    speculative decoding on or off (None: as the checkpoint has it)."""
    raw = yaml.safe_load(Path(path).read_text())
    for entry in raw["services"]:
        settings = entry.get("set") or {}
        if "checkpoint" in settings:
            settings["checkpoint"] = str(checkpoint.resolve())
        if "precision" in settings:
            settings["precision"] = precision
            if mtp is not None:
                settings["speculative_tokens"] = int(mtp)
    return parse_topology(raw, Path(path).parent)


def _report(args: argparse.Namespace, samples: dict[str, list[dict]], layouts: dict[str, dict]) -> dict:
    rows = []
    for name, runs in samples.items():
        row = {"system": name, "precision": "int8-pasa" if "int8_pasa" in name else "fp32",
               "mtp": "_mtp" in name, **layouts[name]}
        row.update({m: statistics.median(r[m] for r in runs) for m in METRICS})
        for key in ("decode_seqs_per_step", "tokens_per_step"):
            if key in runs[0]:
                row[key] = statistics.median(r[key] for r in runs)
        if "cpu" in runs[0]:
            row["cpu"] = _median_split([r["cpu"] for r in runs])
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["ratio_to_hf"] = row["output_tok_s"] / base["output_tok_s"] if base["output_tok_s"] else 0.0
        row["cpu_per_token_vs_hf"] = row["cpu_s_per_token"] / base["cpu_s_per_token"] if base["cpu_s_per_token"] else 0.0
    config = {k: v for k, v in vars(args).items() if k != "handler"}
    return {"config": config, "rows": rows, "samples": samples, "measured_at": time.strftime("%Y-%m-%d %H:%M")}


def _median_split(splits: list[dict]) -> dict:
    """Per kind: the median over repeats of CPU-seconds per output token and of the share."""
    kinds = {k for s in splits for k in s["kinds"]}
    out = {"kinds": {}, "non_die_share": statistics.median(s["non_die_share"] for s in splits),
           "cpu_s_per_token": statistics.median(s["cpu_s_per_token"] for s in splits)}
    for kind in sorted(kinds, key=kind_order):
        values = [s["kinds"].get(kind, {"cpu_s_per_token": 0.0, "share": 0.0}) for s in splits]
        out["kinds"][kind] = {"cpu_s_per_token": statistics.median(v["cpu_s_per_token"] for v in values),
                              "share": statistics.median(v["share"] for v in values)}
    return out


def _cpu_bars(rows: list[dict]) -> dict[str, dict[str, float]]:
    """system -> {kind: CPU-ms per output token}; a one-process system is one kind, "process"."""
    return {r["system"]: ({k: v["cpu_s_per_token"] * 1e3 for k, v in r["cpu"]["kinds"].items()} if "cpu" in r
                          else {"process": r["cpu_s_per_token"] * 1e3}) for r in rows}


def _print(report: dict) -> None:
    print(f"{'system':<24} {'threads':>7} {'out tok/s':>9} {'vs HF':>6} {'TTFT p50/p99 ms':>17} "
          f"{'TPOT p50/p99 ms':>17} {'CPU ms/tok':>10} {'vs HF':>6} {'seqs/step':>9} {'tok/seq/step':>12}")
    for r in report["rows"]:
        seqs = f"{r['decode_seqs_per_step']:.1f}" if "decode_seqs_per_step" in r else "-"
        tokens = f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else "-"
        threads = r["threads"] if r["processes"] == 1 else f"1 x {sum(r['processes'].values())}"
        print(f"{r['system']:<24} {threads:>7} {r['output_tok_s']:>9.1f} {r['ratio_to_hf']:>5.2f}x "
              f"{r['ttft_p50_ms']:>8.0f}/{r['ttft_p99_ms']:<8.0f} {r['tpot_p50_ms']:>8.1f}/{r['tpot_p99_ms']:<8.1f} "
              f"{r['cpu_s_per_token'] * 1e3:>10.2f} {r['cpu_per_token_vs_hf']:>5.2f}x {seqs:>9} {tokens:>12}")
    for r in report["rows"]:
        if "cpu" in r:
            print(f"{r['system']}: {describe(r['cpu'])}")
