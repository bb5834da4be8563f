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


def render_tree(spans: list[dict], max_lines: int = 80) -> str:
    """Indented tree, children by start time: 'name  [service]  duration ms'. Runs of siblings
    with the same name and service fold into one line ('x N', summed duration)."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str | None, list[dict]] = defaultdict(list)
    for s in spans:
        parent = s.get("parent_span_id")
        children[parent if parent in by_id else None].append(s)
    lines: list[str] = []

    def walk(group: list[dict], depth: int) -> None:
        span = group[0]
        service = process_of(span)
        total_ms = sum(s["duration_s"] for s in group) * 1e3
        count = f" x {len(group)}" if len(group) > 1 else ""
        lines.append(f"{'  ' * depth}{span['name']}{count}  [{service}]  {total_ms:.2f} ms")
        kids = sorted((c for s in group for c in children[s["span_id"]]), key=lambda c: c["start_unix_nano"])
        for run in _runs(kids):
            walk(run, depth + 1)

    for run in _runs(sorted(children[None], key=lambda c: c["start_unix_nano"])):
        walk(run, 0)
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines)"]
    return "\n".join(lines)


def _runs(spans: list[dict]) -> list[list[dict]]:
    """Consecutive spans with the same name and service, grouped."""
    runs: list[list[dict]] = []
    for s in spans:
        key = (s["name"], process_of(s))
        if runs and (runs[-1][0]["name"], process_of(runs[-1][0])) == key:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def process_of(span: dict) -> str:
    """The process a span came from: its ``service.instance.id`` (``gateway-0``), or the service."""
    resource = span.get("resource", {})
    return resource.get("service.instance.id") or resource.get("service.name", "?")
