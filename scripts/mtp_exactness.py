"""MTP speculative decoding's exactness and acceptance on held-out prompts (docs/mtp.md): greedy
tokens with speculative_tokens 1 against the same engine with 0, token for token, in process and
through the suite (fp32 and int8-pasa; two microbatches with forced preemption; clients leaving
mid-stream; a decode instance SIGKILLed mid-stream), and the served acceptance next to `cmx eval`'s.

    python scripts/mtp_exactness.py --out runs/mtp/exactness.json           # ~15 min on 2 cores
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from cloudmatrix.bench.serve.workload import held_out
from cloudmatrix.checkpoints import load_for_precision, load_model
from cloudmatrix.clients.gateway import GatewayClient
from cloudmatrix.evaluation.mtp import greedy_acceptance
from cloudmatrix.instance.local_driver import LocalDriver
from cloudmatrix.instance.loop import LoopSettings, StepLoop
from cloudmatrix.instance.metrics import SPEC_SERIES, scrape, speculation
from cloudmatrix.instance.request import Request
from cloudmatrix.instance.scheduler import SchedulerLimits
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.sampling_params import SamplingParams, StopRule

MODEL = Path(__file__).resolve().parents[1] / "models" / "cmx-tiny-py"


def cmx(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "cloudmatrix.cli.main", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cmx {' '.join(args)} failed:\n{done.stderr[-3000:]}")


async def in_process(checkpoint: Path, precision: str, speculative: int, prompts, tokens: int,
                     max_step_tokens: int = 4096) -> dict:
    """The in-process engine; its step budget defaults to a prefill instance's (no 64-token prompt
    of a 64-prompt burst is cut: a PASA prompt's KV depends on where its chunks end)."""
    model = load_for_precision(checkpoint, parse_precision(precision), mtp=bool(speculative))
    blocks = sum(-(-(len(p) + tokens + 1) // 16) for p in prompts) + 8
    driver = LocalDriver(model, blocks)
    limits = SchedulerLimits(max_running=len(prompts), max_waiting=len(prompts), max_step_tokens=max_step_tokens,
                             speculative_tokens=speculative)
    loop = StepLoop(driver, driver.load, limits, LoopSettings("in-process", probe_interval_s=3600.0))
    await loop.start()

    async def one(i: int, prompt: list[int]) -> list[int]:
        out = []
        request = Request(f"r{i}", list(prompt), SamplingParams(max_tokens=tokens), StopRule(tokens, ignore_eos=True))
        async for event in loop.submit(request):
            out += event.token_ids
        return out

    outputs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    counts, used = loop.scheduler.speculation, loop.scheduler.blocks.used
    await loop.stop()
    return {"outputs": outputs, "drafts": counts.drafts, "accepted": counts.accepted, "blocks_used_after": used}


def topology(path: Path, checkpoint: Path, precision: str, speculative: int, decodes: int, decode: dict) -> Path:
    common = {"checkpoint": str(checkpoint), "precision": precision, "fabric": "{addresses:fabric}",
              "kvcache": "{addresses:kvcache}", "speculative_tokens": speculative}
    services = [{"name": "kvcache", "service": "kvcache", "count": 2}, {"name": "fabric", "service": "ub_fabric"},
                {"name": "pdie", "service": "npu_emulator"},
                {"name": "prefill", "service": "prefill", "set": {**common, "dies": "{addresses:pdie}"}}]
    for i in range(decodes):
        services += [{"name": f"ddie{i}", "service": "npu_emulator", "count": 2},
                     {"name": f"decode{i}", "service": "decode",
                      "set": {**common, "dies": f"{{addresses:ddie{i}}}", "instance_id": f"decode-{i}", **decode}}]
    services.append({"name": "gateway", "service": "gateway", "set": {
        "checkpoint": str(checkpoint), "prefill": "{addresses:prefill}",
        "decode": ",".join(f"{{addresses:decode{i}}}" for i in range(decodes))}})
    path.write_text(yaml.safe_dump({"name": "mtp-exactness", "services": services}))
    return path


async def serve(address: str, prompts, tokens: int, leave_after: dict[int, int], kill: Path | None) -> list[list[int]]:
    """Every prompt at once through the gateway; stream i is left after leave_after[i] tokens;
    with ``kill`` (a ready file), that process is SIGKILLed once a quarter of the tokens streamed."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    streamed, killed = [0], [kill is None]
    async with GatewayClient(address) as gateway:
        model = (await gateway.list_models())[0].id

        async def one(i: int, prompt: list[int]) -> list[int]:
            out: list[int] = []
            async for chunk in gateway.generate(model, prompt, params):
                out += chunk.token_ids
                streamed[0] += len(chunk.token_ids)
                if not killed[0] and streamed[0] >= len(prompts) * tokens // 4:
                    killed[0] = True
                    os.kill(json.loads(kill.read_text())["pid"], signal.SIGKILL)
                if i in leave_after and len(out) >= leave_after[i]:
                    break
            return out

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def suite_run(tmp: Path, name: str, checkpoint: Path, precision: str, speculative: int, prompts, tokens: int,
              decodes: int = 1, decode: dict | None = None, leave_after: dict[int, int] | None = None,
              kill: str | None = None) -> tuple[list[list[int]], dict]:
    """The outputs, and the MTP drafts the (first) decode instance counted."""
    run_dir = tmp / name
    cmx("up", "--topology", str(topology(tmp / f"{name}.yaml", checkpoint, precision, speculative, decodes,
                                         decode or {})), "--run-dir", str(run_dir))
    try:
        port = json.loads((run_dir / "ready" / "gateway-0.json").read_text())["port"]
        started = time.perf_counter()
        outputs = asyncio.run(serve(f"127.0.0.1:{port}", prompts, tokens, leave_after or {},
                                    run_dir / "ready" / f"{kill}.json" if kill else None))
        print(f"  {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        decode = "decode1-0" if kill else "decode0-0"
        port = json.loads((run_dir / "ready" / f"{decode}.json").read_text())["metrics_port"]
        counts = scrape(f"http://127.0.0.1:{port}", SPEC_SERIES)
        return outputs, speculation(*(counts[s] for s in SPEC_SERIES))
    finally:
        cmx("down", "--run-dir", str(run_dir))


def acceptance(tmp: Path, int8: Path) -> dict:
    """Served acceptance on `cmx eval`'s acceptance prompts (32 x 128 tokens of the test split, 64
    new tokens, greedy) next to the acceptance `cmx eval` computes offline on them."""
    prompts = [r.prompt for r in held_out(MODEL, 32, 128, 64)]
    offline = greedy_acceptance(load_model(MODEL, mtp=True), torch.tensor(prompts), 64)
    out = {"offline_eval": offline["acceptance"]}
    for precision, ckpt in (("fp32", MODEL), ("int8-pasa", int8)):
        _, spec = suite_run(tmp, f"acceptance-{precision}", ckpt, precision, 1, prompts, 64)
        out[f"served_{precision}"] = spec
        print(f"acceptance {precision}: served {spec['acceptance_rate']:.4f}, offline {offline['acceptance']:.4f}",
              file=sys.stderr)
    return out


def compare(name: str, got: list[list[int]], want: list[list[int]], prefix_ok: set[int] = frozenset()) -> dict:
    """Token-for-token agreement; streams in ``prefix_ok`` (left by their client) must be a prefix."""
    bad = [i for i, (g, w) in enumerate(zip(got, want))
           if (g != w[:len(g)] if i in prefix_ok else g != w)]
    print(f"{name}: {len(got) - len(bad)}/{len(got)} sequences equal" + (f"; differ: {bad}" if bad else ""),
          file=sys.stderr)
    return {"sequences": len(got), "equal": len(got) - len(bad), "differ": bad,
            "tokens": sum(len(g) for g in got)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="runs/mtp/exactness.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompts = [r.prompt for r in held_out(MODEL, args.prompts, args.prompt_len, args.tokens)]
    report: dict = {"config": vars(args), "in_process": {}, "suite": {}}
    with tempfile.TemporaryDirectory(prefix="cmx-mtp-") as tmp:
        tmp = Path(tmp)
        int8 = tmp / "cmx-tiny-py-int8"
        cmx("quantize", "--checkpoint", str(MODEL), "--out", str(int8))
        checkpoints = {"fp32": MODEL, "int8-pasa": int8}
        plain = {}
        for precision, ckpt in checkpoints.items():
            off, on = (asyncio.run(in_process(ckpt, precision, s, prompts, args.tokens)) for s in (0, 1))
            plain[precision] = off["outputs"]
            report["in_process"][precision] = {**compare(f"in process {precision}", on["outputs"], off["outputs"]),
                                               "acceptance": on["accepted"] / max(on["drafts"], 1),
                                               "blocks_used_after": [off["blocks_used_after"], on["blocks_used_after"]]}
        # With a 1024-token step budget the drafts move where prompts are cut into chunks.
        cut = [asyncio.run(in_process(int8, "int8-pasa", s, prompts, args.tokens, 1024)) for s in (0, 1)]
        report["in_process"]["int8-pasa_budget_1024"] = {
            "spec1_vs_spec0": compare("in process int8-pasa, budget 1024", cut[1]["outputs"], cut[0]["outputs"]),
            "spec0_vs_budget_4096": compare("int8-pasa budget 1024 vs 4096, spec 0", cut[0]["outputs"],
                                            plain["int8-pasa"])}
        runs = report["suite"]
        for precision, ckpt in checkpoints.items():
            served = {}
            for s in (0, 1):
                served[s], spec = suite_run(tmp, f"{precision}-spec{s}", ckpt, precision, s, prompts, args.tokens)
                runs[f"{precision}_spec{s}"] = {**compare(f"suite {precision} spec {s}", served[s], plain[precision]),
                                                "speculation": spec}
            runs[f"{precision}_spec1_vs_spec0"] = compare(f"suite {precision} spec 1 vs spec 0", served[1], served[0])
        got, spec = suite_run(tmp, "fp32-microbatches-preemption", MODEL, "fp32", 1, prompts, args.tokens,
                              decode={"microbatches": 2, "kv_blocks_per_die": 40})
        runs["fp32_spec1_two_microbatches_preemption"] = {
            **compare("two microbatches, preemption", got, plain["fp32"]), "speculation": spec}
        leave = {i: 1 + i % 17 for i in range(0, len(prompts), 3)}
        got, _ = suite_run(tmp, "fp32-clients-leave", MODEL, "fp32", 1, prompts, args.tokens, leave_after=leave)
        runs["fp32_spec1_clients_leave"] = compare("clients leaving", got, plain["fp32"], set(leave))
        for precision, ckpt in checkpoints.items():
            got, _ = suite_run(tmp, f"{precision}-sigkill", ckpt, precision, 1, prompts, args.tokens, decodes=2,
                               kill="decode0-0")
            runs[f"{precision}_spec1_decode_sigkilled"] = compare(f"{precision} decode SIGKILLed", got, plain[precision])
        report["acceptance"] = acceptance(tmp, int8)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
