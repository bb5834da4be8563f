"""Read the JSON-lines span files of a run and show one request's trace as a tree."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def read_spans(span_dir: Path) -> list[dict]:
    spans = []
    for path in sorted(span_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


def trace_of_request(spans: list[dict], request_id: str) -> list[dict]:
    """Every span of the trace whose spans carry attribute request_id == ``request_id``."""
    trace_ids = {s["trace_id"] for s in spans if s.get("attributes", {}).get("request_id") == request_id}
    if not trace_ids:
        raise ValueError(f"no span carries request_id {request_id!r}")
    return [s for s in spans if s["trace_id"] in trace_ids]


def render_tree(spans: list[dict]) -> str:
    """Indented tree, children by start time: 'name  [service]  duration ms'."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str | None, list[dict]] = defaultdict(list)
    for s in spans:
        parent = s.get("parent_span_id")
        children[parent if parent in by_id else None].append(s)
    lines: list[str] = []

    def walk(span: dict, depth: int) -> None:
        service = span.get("resource", {}).get("service.name", "?")
        lines.append(f"{'  ' * depth}{span['name']}  [{service}]  {span['duration_s'] * 1e3:.2f} ms")
        for child in sorted(children[span["span_id"]], key=lambda c: c["start_unix_nano"]):
            walk(child, depth + 1)

    for root in sorted(children[None], key=lambda c: c["start_unix_nano"]):
        walk(root, 0)
    return "\n".join(lines)
