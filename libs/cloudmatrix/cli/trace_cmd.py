"""`cmx trace REQUEST_ID`: one request's spans, across every service, as a tree with durations.

It waits until the trace is complete (spans reach the files in batches, each process on its own
schedule; see ``trace_view.incomplete``), so it can run right after the request ends.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cloudmatrix.launcher.bringup import read_telemetry
from cloudmatrix.telemetry.trace_view import incomplete, render_tree, wait_for_trace


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("trace", help="print a request's trace tree from the run's span files")
    parser.add_argument("request_id", help="the id the gateway gave the request (the part after 'cmpl-')")
    parser.add_argument("--run-dir", default="runs/local", help="the run whose spans/ to read")
    parser.add_argument("--wait", type=float, default=15.0,
                        help="seconds to wait for the trace to be complete before printing what there is")
    parser.add_argument("--all", action="store_true",
                        help="every span on its own line: no folding of repeated siblings, no line limit")
    parser.add_argument("--depth", type=int, default=None, help="show this many levels below the root")
    parser.add_argument("--max-lines", type=int, default=80, help="lines to print unless --all")
    parser.set_defaults(handler=_trace)


def _trace(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    span_dir = run_dir / "spans"
    if args.depth is not None and args.depth < 0:
        raise ValueError(f"--depth must be >= 0, got {args.depth}")
    request_id = args.request_id.removeprefix("cmpl-").removeprefix("chatcmpl-")
    try:
        if not span_dir.is_dir():
            raise ValueError(f"no span files under {span_dir}")
        spans = wait_for_trace(span_dir, request_id, args.wait)
    except ValueError as err:
        raise ValueError(f"{err}{_elsewhere(run_dir)}") from err
    services = sorted({s.get("resource", {}).get("service.name", "?") for s in spans})
    print(f"request {request_id}: {len(spans)} spans from {', '.join(services)}")
    print(render_tree(spans, max_lines=None if args.all else args.max_lines, max_depth=args.depth,
                      fold=not args.all))
    missing = incomplete(spans)
    if missing:
        print(f"cmx trace: the trace is incomplete after {args.wait:g} s: {'; '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def _elsewhere(run_dir: Path) -> str:
    """Where else the run's spans went, when it exported them over OTLP."""
    endpoint = read_telemetry(run_dir).get("otlp_endpoint")
    return f" (this run also exported its spans over OTLP to {endpoint}: search there for the attribute " \
           f"request_id)" if endpoint else ""
