"""`cmx bench <name>`: benchmarks that print a table and write JSON (see docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import importlib

# Each module under cloudmatrix.bench exposes register(subparsers) adding its own sub-command.
BENCHMARKS = ("pasa", "kernels", "fabric", "kvcache", "serve", "compare")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark (JSON output)")
    benches = parser.add_subparsers(dest="bench", required=True)
    for name in BENCHMARKS:
        importlib.import_module(f"cloudmatrix.bench.{name}").register(benches)
