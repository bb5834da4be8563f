"""`cmx trace REQUEST_ID`: one request's spans, across every service, as a tree with durations."""
from __future__ import annotations

import argparse
from pathlib import Path

from cloudmatrix.telemetry.trace_view import read_spans, render_tree, trace_of_request


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("trace", help="print a request's trace tree from the run's span files")
    parser.add_argument("request_id")
    parser.add_argument("--run-dir", default="runs/local", help="the run whose spans/ to read")
    parser.set_defaults(handler=_trace)


def _trace(args: argparse.Namespace) -> int:
    span_dir = Path(args.run_dir) / "spans"
    if not span_dir.is_dir():
        raise FileNotFoundError(f"no span files under {span_dir}")
    spans = trace_of_request(read_spans(span_dir), args.request_id)
    services = sorted({s.get("resource", {}).get("service.name", "?") for s in spans})
    print(f"request {args.request_id}: {len(spans)} spans from {', '.join(services)}")
    print(render_tree(spans))
    return 0
