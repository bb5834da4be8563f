"""`cmx train`: train a DeepSeek-V3-architecture model (with its MTP module) from scratch on the
Python standard library's source, with the serving model's own code (docs/training.md)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from cloudmatrix.model.presets import PRESETS
from cloudmatrix.train.settings import TrainSettings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train a model from scratch (resumes when --out holds a run)")
    d = TrainSettings(tokens=1)
    parser.add_argument("--out", required=True, help="run directory: checkpoint, train_state/, train.json, loss.png")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=d.preset)
    parser.add_argument("--minutes", type=float, help="budget in minutes of training (the schedule follows it)")
    parser.add_argument("--tokens", type=int, help="budget in training tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="validation every N steps")
    parser.add_argument("--save-every-minutes", type=float, default=d.save_every_minutes)
    parser.add_argument("--export-dtype", choices=("bfloat16", "float32"), default=d.export_dtype,
                        help="dtype of the exported model.safetensors (training itself is fp32)")
    parser.add_argument("--init-from", type=Path,
                        help="continue from a trained checkpoint of the same preset (its weights and tokenizer; "
                             "a new optimizer and schedule)")
    parser.add_argument("--corpus-root", type=Path, help="a directory of .py files instead of this Python's stdlib")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from cloudmatrix.train.trainer import Trainer, default_say
    settings = TrainSettings(
        preset=args.preset, minutes=args.minutes, tokens=args.tokens, threads=args.threads, seq_len=args.seq_len,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
        eval_every=args.eval_every, save_every_minutes=args.save_every_minutes, export_dtype=args.export_dtype,
        init_from=str(args.init_from) if args.init_from else None,
    )
    trainer = Trainer(settings, Path(args.out), corpus_root=args.corpus_root, say=default_say)
    report = trainer.run()
    final = report["final"]["validation"] or {}
    print(f"trained {report['steps']} steps, {report['tokens'] / 1e6:.2f}M tokens in "
          f"{report['wall_time_s'] / 60:.1f} min; validation loss {final.get('lm', float('nan')):.4f}; checkpoint in {args.out}")
    return 0
