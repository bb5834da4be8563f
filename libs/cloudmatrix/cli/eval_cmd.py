"""`cmx eval`: a checkpoint's quality on the test split of its training corpus (docs/model.md)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cloudmatrix.evaluation.run import EvalSettings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="cross-entropy, bits/byte, top-1 per precision vs n-gram baselines; MTP; expert load")
    d = EvalSettings()
    parser.add_argument("--checkpoint", required=True, help="float checkpoint trained by cmx train")
    parser.add_argument("--precisions", default=",".join(d.precisions), help="comma-separated serving precisions")
    parser.add_argument("--max-windows", type=int, help="score only the first N windows of the test split")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--acceptance-prompts", type=int, default=d.acceptance_prompts,
                        help="prompts of the MTP greedy-acceptance run (0: skip it)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the unigram and 3-gram baselines")
    parser.add_argument("--json", type=Path, help="write the full report (JSON) here")
    parser.add_argument("--out-dir", type=Path, help="write expert_load.json (cmx eplb --stats input) and its heatmap here")
    parser.add_argument("--corpus-root", type=Path, help="a directory of .py files instead of this Python's stdlib")
    parser.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    import torch

    from cloudmatrix.evaluation.expert_load import write_expert_load
    from cloudmatrix.evaluation.run import evaluate
    from cloudmatrix.evaluation.table import render
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = EvalSettings(precisions=tuple(p for p in args.precisions.split(",") if p), seq_len=args.seq_len,
                            max_windows=args.max_windows, acceptance_prompts=args.acceptance_prompts,
                            baselines=not args.no_baselines)
    report = evaluate(Path(args.checkpoint), settings, args.corpus_root,
                      say=lambda line: print(line, file=sys.stderr, flush=True))
    report["threads"] = torch.get_num_threads()
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.out_dir and report["expert_load"]:
        for path in write_expert_load(report["expert_load"], args.out_dir):
            print(f"wrote {path}")
    return 0
