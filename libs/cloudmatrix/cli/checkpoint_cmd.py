"""`cmx checkpoint create`: write a deterministic random-init checkpoint in Hugging Face format."""
from __future__ import annotations

import argparse

from cloudmatrix.model.presets import PRESETS, create_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("checkpoint", help="make checkpoints")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="write a random-init checkpoint (same seed, same bytes)")
    create.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    create.add_argument("--out", required=True, help="output directory")
    create.add_argument("--seed", type=int, default=0)
    create.set_defaults(handler=_create)


def _create(args: argparse.Namespace) -> int:
    out = create_checkpoint(args.preset, args.out, seed=args.seed)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out}")
    return 0
