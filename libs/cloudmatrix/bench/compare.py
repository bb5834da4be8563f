"""`cmx bench compare`: one command, one checkpoint, the same prompts and output lengths through
(a) Hugging Face transformers ``generate`` with static batching, (b) this project's in-process
engine (the instance scheduler over a local die: continuous batching, no RPC) and (c) the
distributed suite on the default topology, brought up by the command in fp32 and int8-pasa. With a
checkpoint that has an MTP module (``--checkpoint models/cmx-tiny-py``), (b) and (c) run with MTP
speculative decoding off and on (systems ``*_mtp``), each row with its tokens per decode step.
Repeats run interleaved; each number is the median over repeats; ratios are to (a)."""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from cloudmatrix.bench.compare_systems import hf_generate, in_process, suite
from cloudmatrix.bench.serve import workload
from cloudmatrix.bench.timing import apply_quick, write_report
from cloudmatrix.checkpoints import load_model
from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.topology import parse_topology
from cloudmatrix.model.config import load_config
from cloudmatrix.model.presets import create_checkpoint

QUICK = {"requests": 8, "input_len": 64, "output_len": 16, "repeats": 2}
ENGINES = ("in_process", "suite_fp32", "suite_int8_pasa")
METRICS = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="HF transformers vs the in-process engine vs the suite (fp32, int8-pasa)")
    p.add_argument("--quick", action="store_true", help="8 requests of 64 + 16 tokens, 2 repeats")
    p.add_argument("--requests", type=int, default=32, help="all sent at once to each system")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-batch", type=int, default=0, help="static batch size for transformers (0 = all requests)")
    p.add_argument("--topology", default="topologies/local.yaml")
    p.add_argument("--preset", default="tiny", help="random-weight model preset (without --checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="a trained checkpoint instead (e.g. models/cmx-tiny-py: with its MTP module, MTP off and on)")
    p.add_argument("--held-out", action="store_true",
                   help="prompts from the corpus's test split (with a trained --checkpoint) instead of random ids")
    p.add_argument("--mtp", choices=("auto", "off", "on", "both"), default="auto",
                   help="speculative decoding with the MTP module (auto: both when the checkpoint has one)")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    apply_quick(args, QUICK)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="cmx-compare-") as tmp:
        tmp = Path(tmp)
        float_ckpt, int8_ckpt = _checkpoints(tmp, args.preset, args.checkpoint)
        modes = _mtp_modes(args.mtp, load_config(float_ckpt).num_nextn_predict_layers)
        models = {mtp: load_model(float_ckpt, mtp=mtp) for mtp in modes}
        systems = ["hf_static"] + [_name(engine, mtp) for engine in ENGINES for mtp in modes]
        suites = {_name(f"suite_{p.replace('-', '_')}", mtp): (ckpt, p, mtp) for mtp in modes
                  for ckpt, p in ((float_ckpt, "fp32"), (int8_ckpt, "int8-pasa"))}
        runs = {name: tmp / name for name in suites}
        samples: dict[str, list[dict]] = {name: [] for name in systems}
        try:
            decode_metrics = {name: _decode_metrics(bring_up(_topology(args.topology, *suites[name]),
                                                             runs[name].resolve(), 180.0)) for name in runs}
            for repeat in range(args.repeats):  # interleaved: machine noise hits every system alike
                prompts = (workload.held_out(float_ckpt, args.requests, args.input_len, args.output_len, repeat)
                           if args.held_out else
                           workload.synthetic(args.requests, args.input_len, args.output_len, 0.0,
                                              models[modes[0]].cfg.vocab_size, seed=repeat))
                samples["hf_static"].append(hf_generate(float_ckpt, prompts, args.hf_batch or args.requests))
                for mtp in modes:
                    samples[_name("in_process", mtp)].append(asyncio.run(in_process(models[mtp], prompts)))
                for name in runs:
                    samples[name].append(suite(runs[name], decode_metrics[name], prompts))
        finally:
            for run_dir in runs.values():
                if (run_dir / "state.json").exists():
                    bring_down(run_dir.resolve(), 10.0)
    report = _report(args, systems, samples)
    path = write_report(args.out, "compare", report)
    _print(report)
    print(f"\nthreads: 1 per process (torch); JSON: {path}")
    return 0


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


def _report(args: argparse.Namespace, systems: list[str], samples: dict[str, list[dict]]) -> dict:
    rows = []
    for name in systems:
        runs = samples[name]
        row = {"system": name, "precision": "int8-pasa" if "int8_pasa" in name else "fp32",
               "mtp": name.endswith("_mtp")}
        row.update({m: statistics.median(r[m] for r in runs) for m in METRICS})
        for key in ("decode_seqs_per_step", "tokens_per_step"):
            if key in runs[0]:
                row[key] = statistics.median(r[key] for r in runs)
        rows.append(row)
    base = rows[0]["output_tok_s"]
    for row in rows:
        row["ratio_to_hf"] = row["output_tok_s"] / base if base else 0.0
    config = {k: v for k, v in vars(args).items() if k != "handler"}
    return {"config": config, "rows": rows, "samples": samples, "measured_at": time.strftime("%Y-%m-%d %H:%M")}


def _print(report: dict) -> None:
    print(f"{'system':<22} {'precision':<10} {'out tok/s':>9} {'vs HF':>6} {'TTFT p50/p99 ms':>17} "
          f"{'TPOT p50/p99 ms':>17} {'seqs/decode step':>16} {'tokens/seq/step':>15}")
    for r in report["rows"]:
        seqs = f"{r['decode_seqs_per_step']:.1f}" if "decode_seqs_per_step" in r else "-"
        tokens = f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else "-"
        print(f"{r['system']:<22} {r['precision']:<10} {r['output_tok_s']:>9.1f} {r['ratio_to_hf']:>5.2f}x "
              f"{r['ttft_p50_ms']:>8.0f}/{r['ttft_p99_ms']:<8.0f} {r['tpot_p50_ms']:>8.1f}/{r['tpot_p99_ms']:<8.1f} "
              f"{seqs:>16} {tokens:>15}")
