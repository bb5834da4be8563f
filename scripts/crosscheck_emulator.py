"""Cross-check (b) of the request-level simulator (docs/simulator.md): the suite serves the first
N requests of the Mooncake conversation trace (scaled down 32x for the tiny model) on the default
local topology with MTP off, then the same requests are replayed through the same schedulers in
virtual time, each step priced by a profile fitted on the suite's own measured steps.

    python scripts/crosscheck_emulator.py --limit 80 --out runs/crosscheck

Writes <out>/crosscheck.json and prints it. Takes a few minutes (bringing the topology up and
serving the requests in real time)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "libs"), str(REPO)]

from cloudmatrix.model.config import load_config  # noqa: E402
from cloudmatrix.simulator.replay.emulator import compare  # noqa: E402
from cloudmatrix.simulator.replay.workload import read_mooncake  # noqa: E402
from cloudmatrix.telemetry.trace_view import read_spans  # noqa: E402
from services.decode.config import DecodeConfig  # noqa: E402
from services.prefill.config import PrefillConfig  # noqa: E402

TRACE = REPO / "traces" / "mooncake_conversation_trace.jsonl"
MODEL = REPO / "models" / "cmx-tiny-py"
SCALE = 32
BLOCKS_PER_DIE = 4096  # more than a short run fills: no preemption on either side


def cmx(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cloudmatrix.cli.main", *args], check=True, cwd=REPO)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=80)
    parser.add_argument("--out", default="runs/crosscheck")
    parser.add_argument("--compare-only", action="store_true", help="compare an earlier run in --out again")
    args = parser.parse_args()
    run = (REPO / args.out).resolve()
    run.mkdir(parents=True, exist_ok=True)
    if not args.compare_only:
        serve(run, args.limit)
    checkpoint = str(run / "checkpoints" / "cmx-tiny-py-int8")
    result = compare(read_spans(run / "spans"), read_mooncake(TRACE, args.limit, scale=SCALE),
                     json.loads((run / "serve" / "serve.json").read_text())["runs"][0], load_config(MODEL),
                     PrefillConfig(checkpoint=checkpoint, dies=("die",)),
                     DecodeConfig(checkpoint=checkpoint, dies=("die",), kvcache=("shard",)), BLOCKS_PER_DIE)
    (run / "crosscheck.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def serve(run: Path, limit: int) -> None:
    topology = (REPO / "topologies" / "local.yaml").read_text().replace(
        "      precision: int8-pasa\n", "      precision: int8-pasa\n      speculative_tokens: 0\n")
    (run / "topology.yaml").write_text(topology)
    cmx("quantize", "--checkpoint", str(MODEL), "--out", str(run / "checkpoints" / "cmx-tiny-py-int8"))
    cmx("up", "--topology", str(run / "topology.yaml"), "--run-dir", str(run))
    try:
        cmx("bench", "serve", "--run-dir", str(run), "--trace", str(TRACE), "--scale", str(SCALE),
            "--limit", str(limit), "--out", str(run / "serve"))
    finally:
        cmx("down", "--run-dir", str(run))


if __name__ == "__main__":
    sys.exit(main())
