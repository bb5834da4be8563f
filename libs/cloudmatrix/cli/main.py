"""The `cmx` command line: checkpoints, local generation, and the local process launcher."""
from __future__ import annotations

import argparse
import os
import sys

from cloudmatrix.cli import (
    bench_cmd,
    call_cmd,
    certs_cmd,
    checkpoint_cmd,
    demo_cmd,
    eplb_cmd,
    eval_cmd,
    generate_cmd,
    launcher_cmd,
    plan_cmd,
    quantize_cmd,
    simulate_cmd,
    trace_cmd,
    train_cmd,
)


class _Parser(argparse.ArgumentParser):
    """Every command's --help shows each option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cmx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (checkpoint_cmd, quantize_cmd, generate_cmd, launcher_cmd, demo_cmd, eplb_cmd, eval_cmd, bench_cmd,
                   trace_cmd, call_cmd, simulate_cmd, plan_cmd, certs_cmd, train_cmd):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"cmx {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `cmx status | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
