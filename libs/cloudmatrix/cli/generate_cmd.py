"""`cmx generate`: stream text to stdout from the model in this process (``--local``: the
instance scheduler over an in-process paged KV pool, the dies' own step code) or from the dies of
a running topology (``--instance``). Both speculate with the MTP module when the checkpoint has
one (``--speculative-tokens``, docs/mtp.md)."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import torch

from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.instance.driver import InstanceDriver
from cloudmatrix.instance.generate import StepTimes, generate_on_instance, serving
from cloudmatrix.instance.local_driver import LocalDriver
from cloudmatrix.instance.scheduler import SchedulerLimits
from cloudmatrix.launcher.processes import load_state
from cloudmatrix.launcher.waves import entry_of
from cloudmatrix.model.config import load_config
from cloudmatrix.model.precision import PRECISIONS, parse_precision
from cloudmatrix.model.tokenizer import StreamDecoder, TextTokenizer
from cloudmatrix.quant.int8_checkpoint import is_int8_checkpoint
from cloudmatrix.sampling_params import DEFAULT_MAX_TOKENS, SamplingParams


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="generate text from a prompt")
    parser.add_argument("prompt")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the model in this process")
    where.add_argument("--instance", metavar="RUN_DIR",
                       help="run on the fabric and dies `cmx up` started from RUN_DIR (expert parallel)")
    parser.add_argument("--dies", default="die", metavar="ENTRY",
                        help="with --instance: the topology entry whose npu_emulator processes to drive")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="weights and attention core (docs/model.md#precisions)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="completion tokens (the default is the OpenAI API's and the gateway's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--speculative-tokens", type=int, choices=(0, 1), default=None,
                        help="MTP draft tokens verified per step (default: 1 when the checkpoint has an MTP module)")
    parser.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    tokenizer = TextTokenizer.load(args.checkpoint)
    prompt_ids = tokenizer.encode(args.prompt)
    stream = StreamDecoder(tokenizer)
    sys.stdout.write(args.prompt)
    start = time.perf_counter()
    speculative = args.speculative_tokens
    if speculative is None:
        speculative = min(1, load_config(args.checkpoint).num_nextn_predict_layers)
    if args.local:
        count, note = asyncio.run(_in_process(args, prompt_ids, params, tokenizer.eos_id, stream, speculative))
    else:
        count, note = asyncio.run(_on_instance(args, prompt_ids, params, tokenizer.eos_id, stream, speculative))
    elapsed = time.perf_counter() - start
    sys.stdout.write(stream.flush() + "\n")
    print(f"[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tokens/s, prompt {len(prompt_ids)} tokens, "
          f"{note}]", file=sys.stderr)
    return 0


async def _emit(loop, prompt_ids, params, eos: int, stream: StreamDecoder, times: StepTimes) -> int:
    count = 0
    async for token in generate_on_instance(loop, prompt_ids, params, eos, times):
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
        count += 1
    return count


def _speculation_note(loop, speculative: int) -> str:
    if not speculative:
        return "no speculation"
    counts = loop.scheduler.speculation
    return f"MTP drafts accepted {counts.accepted}/{counts.drafts} ({counts.accepted / max(counts.drafts, 1):.2f})"


async def _in_process(args, prompt_ids, params, eos: int, stream: StreamDecoder, speculative: int) -> tuple[int, str]:
    model = load_for_precision(args.checkpoint, parse_precision(args.precision), mtp=bool(speculative))
    limit = min(len(prompt_ids) + params.max_tokens + 1, model.cfg.max_position_embeddings)
    driver, times = LocalDriver(model, -(-limit // 16) + 1), StepTimes()
    limits = SchedulerLimits(max_running=1, max_waiting=1, speculative_tokens=speculative)
    async with serving(driver, await driver.load(), limits) as loop:
        count = await _emit(loop, prompt_ids, params, eos, stream, times)
        note = _speculation_note(loop, speculative)
    return count, f"{args.threads} thread(s), {times.steps} steps, {note}"


async def _on_instance(args, prompt_ids, params, eos: int, stream: StreamDecoder, speculative: int) -> tuple[int, str]:
    records = load_state(Path(args.instance).resolve())
    fabric = [r.address for r in records if r.service == "ub_fabric"]
    dies = [r.address for r in records if r.service == "npu_emulator" and entry_of(r.name) == args.dies]
    if not dies:
        raise ValueError(f"{args.instance} runs no npu_emulator processes of entry {args.dies!r}")
    shards = [r.address for r in records if r.service == "kvcache"]
    checkpoint = str(Path(args.checkpoint).resolve())
    # Weights come through the pool's model cache when the run has kvcache shards and the die can
    # use the checkpoint as stored (no in-memory quantization).
    use_cache = shards and is_int8_checkpoint(checkpoint) == parse_precision(args.precision).int8_weights
    driver = InstanceDriver(dies, fabric[0] if fabric else "", group=f"cli-{os.getpid()}")
    times = StepTimes()
    try:
        blocks = await driver.load(checkpoint, args.precision, model_cache=shards if use_cache else None,
                                   speculative_tokens=speculative)
        loaded = driver.loaded
        async with serving(driver, blocks, SchedulerLimits(speculative_tokens=speculative)) as loop:
            count = await _emit(loop, prompt_ids, params, eos, stream, times)
            note = _speculation_note(loop, speculative)
    finally:
        await driver.close()
    source = ("weights from the model cache" if all(r.from_model_cache for r in loaded)
              else "weights from disk, published to the model cache" if use_cache else "weights from disk")
    return count, (f"EP{len(dies)} over the fabric, {source}; modeled CloudMatrix384 {times.modeled_s * 1e3:.2f} ms "
                   f"for {times.steps} steps ({times.modeled_s / max(times.steps, 1) * 1e6:.0f} us/step), {note}")
