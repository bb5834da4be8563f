"""Read the JSON-lines span files of a run and show one request's trace as a tree."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path


def span_files(span_dir: Path) -> list[Path]:
    """Every span file of a run, rotated ones (``x.jsonl.1``) included."""
    return sorted(p for p in span_dir.glob("*.jsonl*") if p.name.endswith(".jsonl") or p.suffix[1:].isdigit())


def read_spans(span_dir: Path, containing: str | None = None) -> list[dict]:
    """The spans in ``span_dir``'s files; with ``containing``, only lines holding that text (a
    cheap filter before parsing: a request id, a trace id)."""
    spans = []
    for path in span_files(span_dir):
        try:
            text = path.read_text()
        except FileNotFoundError:  # rotated away while we listed
            continue
        for line in text.splitlines():
            if line.strip() and (containing is None or containing in line):
                try:
                    spans.append(json.loads(line))
                except json.JSONDecodeError:  # a line being written right now
                    continue
    return spans


def trace_of_request(spans: list[dict], request_id: str) -> list[dict]:
    """Every span of the trace whose spans carry attribute request_id == ``request_id``."""
    trace_ids = {s["trace_id"] for s in spans if s.get("attributes", {}).get("request_id") == request_id}
    if not trace_ids:
        raise ValueError(f"no span carries request_id {request_id!r}")
    return [s for s in spans if s["trace_id"] in trace_ids]


def read_request_trace(span_dir: Path, request_id: str) -> list[dict]:
    """The request's trace from ``span_dir`` (``ValueError`` when no span names the request)."""
    trace_ids = {s["trace_id"] for s in read_spans(span_dir, request_id)
                 if s.get("attributes", {}).get("request_id") == request_id}
    if not trace_ids:
        raise ValueError(f"no span carries request_id {request_id!r}")
    return [s for t in sorted(trace_ids) for s in read_spans(span_dir, t) if s["trace_id"] == t]


def incomplete(spans: list[dict]) -> list[str]:
    """Why a trace is not complete yet (spans reach the files in batches, each process on its own
    schedule), or [] when it is: its root span has ended, every span's parent is there, and every
    call that did not fail has its server's span."""
    ids = {s["span_id"] for s in spans}
    parents = {s.get("parent_span_id") for s in spans}
    reasons = []
    if not any(not s.get("parent_span_id") for s in spans):
        reasons.append("the root span has not ended")
    orphans = sum(1 for s in spans if s.get("parent_span_id") and s["parent_span_id"] not in ids)
    if orphans:
        reasons.append(f"{orphans} spans wait for their parent span")
    unanswered = sum(1 for s in spans if s.get("kind") == "CLIENT" and s.get("status") != "ERROR"
                     and s["span_id"] not in parents)
    if unanswered:
        reasons.append(f"{unanswered} calls wait for their server's span")
    return reasons


def wait_for_trace(span_dir: Path, request_id: str, timeout_s: float, poll_s: float = 0.25) -> list[dict]:
    """The request's trace once ``incomplete`` finds nothing missing, or what there is at the
    timeout (check ``incomplete`` on it); ``ValueError`` when no span of it ever arrived."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            spans = read_request_trace(span_dir, request_id)
        except ValueError:
            if time.monotonic() >= deadline:
                raise
            spans = []
        if (spans and not incomplete(spans)) or time.monotonic() >= deadline:
            return spans
        time.sleep(poll_s)


def render_tree(spans: list[dict], max_lines: int | None = 80, max_depth: int | None = None,
                fold: bool = True) -> str:
    """Indented tree, children by start time: 'name  [process]  duration ms'. With ``fold``, runs
    of siblings with the same name and process fold into one line ('x N', summed duration).
    Levels deeper than ``max_depth`` (0 = roots only) and lines past ``max_lines`` are left out,
    saying how many."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str | None, list[dict]] = defaultdict(list)
    for s in spans:
        parent = s.get("parent_span_id")
        children[parent if parent in by_id else None].append(s)
    lines: list[str] = []
    hidden = 0

    def walk(group: list[dict], depth: int) -> None:
        nonlocal hidden
        span = group[0]
        total_ms = sum(s["duration_s"] for s in group) * 1e3
        count = f" x {len(group)}" if len(group) > 1 else ""
        lines.append(f"{'  ' * depth}{span['name']}{count}  [{process_of(span)}]  {total_ms:.2f} ms")
        kids = sorted((c for s in group for c in children[s["span_id"]]), key=lambda c: c["start_unix_nano"])
        if max_depth is not None and depth >= max_depth:
            hidden += _count_below(kids, children)
            return
        for run in _runs(kids, fold):
            walk(run, depth + 1)

    for run in _runs(sorted(children[None], key=lambda c: c["start_unix_nano"]), fold):
        walk(run, 0)
    if hidden:
        lines.append(f"... ({hidden} deeper spans; --depth shows more)")
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines; --all shows them)"]
    return "\n".join(lines)


def _count_below(kids: list[dict], children: dict[str | None, list[dict]]) -> int:
    return sum(1 + _count_below(children[k["span_id"]], children) for k in kids)


def _runs(spans: list[dict], fold: bool = True) -> list[list[dict]]:
    """Consecutive spans with the same name and process, grouped (with ``fold``)."""
    runs: list[list[dict]] = []
    for s in spans:
        key = (s["name"], process_of(s))
        if fold and runs and (runs[-1][0]["name"], process_of(runs[-1][0])) == key:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def process_of(span: dict) -> str:
    """The process a span came from: its ``service.instance.id`` (``gateway-0``), or the service."""
    resource = span.get("resource", {})
    return resource.get("service.instance.id") or resource.get("service.name", "?")
