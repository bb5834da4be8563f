"""`cmx generate --local`: run the in-process reference engine and stream text to stdout."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from cloudmatrix.model.generate import generate
from cloudmatrix.model.precision import PRECISIONS, load_for_precision, parse_precision
from cloudmatrix.model.sampling import SamplingParams
from cloudmatrix.model.tokenizer import StreamDecoder, TextTokenizer


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="generate text from a prompt")
    parser.add_argument("prompt")
    parser.add_argument("--local", action="store_true", required=True,
                        help="run the model in this process (the only mode until the gateway exists)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="weights and attention core (docs/model.md#precisions)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    tokenizer = TextTokenizer.load(args.checkpoint)
    model = load_for_precision(args.checkpoint, parse_precision(args.precision))
    prompt_ids = tokenizer.encode(args.prompt)
    stream = StreamDecoder(tokenizer)
    sys.stdout.write(args.prompt)
    start, count = time.perf_counter(), 0
    for token in generate(model, prompt_ids, params):
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
        count += 1
    elapsed = time.perf_counter() - start
    sys.stdout.write(stream.flush() + "\n")
    print(f"[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tokens/s, prompt {len(prompt_ids)} tokens, "
          f"{args.threads} thread(s)]", file=sys.stderr)
    return 0
