"""One in-process system of `cmx bench compare` in a process of its own: transformers' ``generate``
or the project's in-process engine, with the threads asked, nothing else running beside it.

``python -m cloudmatrix.bench.compare_child SPEC.json`` reads {"system": "hf" | "in_process",
"checkpoint", "threads", "mtp", "hf_batch", "prompts": [[ids]], "warmup": [[ids]] (optional: sent
first, untimed), "output_len"} and prints one JSON
line: the system's summary (compare_systems), the CPU-seconds the process spent generating (every
thread), its threads and allocator settings.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cloudmatrix.bench.compare_systems import hf_generate, in_process
from cloudmatrix.bench.cpu import allocator_settings
from cloudmatrix.bench.serve.workload import BenchRequest
from cloudmatrix.checkpoints import load_model


def run_child(spec: dict, timeout_s: float = 1800.0) -> dict:
    """Run ``spec`` in a fresh Python process and return its result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="cmx-compare-") as f:
        json.dump(spec, f)
        f.flush()
        done = subprocess.run([sys.executable, "-m", "cloudmatrix.bench.compare_child", f.name],
                              capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"compare child {spec['system']} ({spec['threads']} threads) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(spec: dict) -> dict:
    prompts, warmup = ([BenchRequest(list(p), spec["output_len"]) for p in spec.get(key, ())]
                       for key in ("prompts", "warmup"))
    checkpoint = Path(spec["checkpoint"])
    if spec["system"] == "hf":
        return hf_generate(checkpoint, prompts, spec["hf_batch"] or len(prompts), time.process_time, warmup)
    if spec["system"] == "in_process":
        model = load_model(checkpoint, mtp=spec["mtp"])
        return asyncio.run(in_process(model, prompts, time.process_time, warmup))  # this process, every thread
    raise ValueError(f"system: must be hf or in_process, got {spec['system']!r}")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(spec["threads"])
    result = _measure(spec)
    result.update(threads=torch.get_num_threads(), processes=1, **allocator_settings(os.environ))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
