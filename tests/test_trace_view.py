"""Span files and `cmx trace`: rotation keeps a process's spans bounded, a trace counts as complete
only when its root has ended, every parent is there and every call has its server's span, and the
tree can be shown whole (--all) or to a depth."""
from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from cloudmatrix.cli.main import main
from cloudmatrix.launcher.bringup import TELEMETRY_FILE
from cloudmatrix.telemetry.trace_view import (
    incomplete,
    read_request_trace,
    read_spans,
    render_tree,
    span_files,
    wait_for_trace,
)
from cloudmatrix.telemetry.tracing import JsonLinesSpanExporter


def _provider(path: Path, service: str, instance: str, **rotation) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service, SERVICE_INSTANCE_ID: instance}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(str(path), **rotation)))
    return provider


def _request_spans(span_dir: Path, request_id: str, forwards: int = 3) -> list[dict]:
    """A gateway -> decode call with ``forwards`` Forward children, as two processes write it."""
    gateway = _provider(span_dir / "gateway-0-1.jsonl", "gateway", "gateway-0")
    decode = _provider(span_dir / "decode-0-2.jsonl", "decode", "decode-0")
    with gateway.get_tracer("t").start_as_current_span("gateway.generate", attributes={"request_id": request_id}):
        with gateway.get_tracer("t").start_as_current_span("/cmx.decode.v1.Decode/Decode", kind=SpanKind.CLIENT):
            with decode.get_tracer("t").start_as_current_span("/cmx.decode.v1.Decode/Decode", kind=SpanKind.SERVER):
                for _ in range(forwards):
                    with decode.get_tracer("t").start_as_current_span("engine.step"):
                        pass
    gateway.shutdown()
    decode.shutdown()
    return read_request_trace(span_dir, request_id)


def test_a_trace_is_complete_only_with_its_root_every_parent_and_every_server_span(tmp_path):
    spans = _request_spans(tmp_path, "r1")
    assert len(spans) == 6 and incomplete(spans) == []
    by_name = {s["name"] + s["kind"]: s for s in spans}
    without = lambda *names: [s for s in spans if s["name"] + s["kind"] not in names]  # noqa: E731
    assert incomplete(without("gateway.generateINTERNAL")) == ["the root span has not ended",
                                                               "1 spans wait for their parent span"]
    assert incomplete(without("/cmx.decode.v1.Decode/DecodeSERVER")) == ["3 spans wait for their parent span",
                                                                         "1 calls wait for their server's span"]
    failed = dict(by_name["/cmx.decode.v1.Decode/DecodeCLIENT"], status="ERROR")
    assert incomplete([failed, by_name["gateway.generateINTERNAL"]]) == []  # a failed call needs no server span


def test_the_tree_folds_repeats_unless_all_and_stops_at_a_depth(tmp_path):
    spans = _request_spans(tmp_path, "r2", forwards=4)
    folded = render_tree(spans).splitlines()
    assert folded[0].startswith("gateway.generate  [gateway-0]")
    assert folded[1].startswith("  /cmx.decode.v1.Decode/Decode  [gateway-0]")
    assert folded[2].startswith("    /cmx.decode.v1.Decode/Decode  [decode-0]")
    assert folded[3].startswith("      engine.step x 4  [decode-0]") and len(folded) == 4
    whole = render_tree(spans, max_lines=None, fold=False).splitlines()
    assert [line.strip().split()[0] for line in whole[3:]] == ["engine.step"] * 4
    shallow = render_tree(spans, max_depth=1).splitlines()
    assert len(shallow) == 3 and shallow[-1] == "... (5 deeper spans; --depth shows more)"
    assert render_tree(spans, max_lines=2, fold=False).splitlines()[-1] == "... (5 more lines; --all shows them)"


def test_span_files_rotate_and_stay_bounded(tmp_path):
    path = tmp_path / "spans" / "npu-7.jsonl"
    provider = _provider(path, "npu_emulator", "die-0", max_bytes=4096, backups=2)
    names = [f"span-{i}-{uuid.uuid4().hex[:8]}" for i in range(200)]
    for name in names:
        with provider.get_tracer("t").start_as_current_span(name):
            pass
    provider.shutdown()
    files = span_files(path.parent)
    assert [p.name for p in files] == ["npu-7.jsonl", "npu-7.jsonl.1", "npu-7.jsonl.2"]
    assert all(p.stat().st_size <= 4096 for p in files)
    kept = [s["name"] for s in read_spans(path.parent)]
    assert names[-1] in kept and names[0] not in kept  # the newest are kept, the oldest dropped
    assert set(kept) <= set(names) and len(kept) == len(set(kept))
    with pytest.raises(ValueError, match="max_bytes"):
        JsonLinesSpanExporter(str(path), max_bytes=-1)


def test_wait_for_trace_returns_once_the_late_process_has_written(tmp_path):
    spans = _request_spans(tmp_path / "all", "r3")
    late = {"decode-0"}
    span_dir = tmp_path / "run" / "spans"
    span_dir.mkdir(parents=True)
    early = [s for s in spans if s["resource"]["service.instance.id"] not in late]
    (span_dir / "gateway.jsonl").write_text("".join(json.dumps(s) + "\n" for s in early))
    assert incomplete(wait_for_trace(span_dir, "r3", timeout_s=0.3, poll_s=0.05)) != []
    arrived = threading.Event()

    def write_late() -> None:
        (span_dir / "decode.jsonl").write_text("".join(json.dumps(s) + "\n" for s in spans if s not in early))
        arrived.set()

    timer = threading.Timer(0.3, write_late)
    timer.start()
    try:
        whole = wait_for_trace(span_dir, "r3", timeout_s=60.0, poll_s=0.05)
    finally:
        timer.cancel()
    assert arrived.is_set() and incomplete(whole) == [] and len(whole) == len(spans)
    with pytest.raises(ValueError, match="no span carries request_id 'nope'"):
        wait_for_trace(span_dir, "nope", timeout_s=0.1, poll_s=0.05)


def test_cmx_trace_prints_the_tree_reports_an_incomplete_one_and_says_where_otlp_spans_went(tmp_path, capsys):
    run_dir = tmp_path / "run"
    spans = _request_spans(run_dir / "spans", "r4", forwards=2)
    assert main(["trace", "cmpl-r4", "--run-dir", str(run_dir), "--all"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "request r4: 5 spans from decode, gateway"
    assert out.count("engine.step  [decode-0]") == 2
    assert main(["trace", "r4", "--run-dir", str(run_dir), "--depth", "0"]) == 0
    root = next(s for s in spans if s["name"] == "gateway.generate")
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"gateway.generate  [gateway-0]  {root['duration_s'] * 1e3:.2f} ms", "... (4 deeper spans; --depth shows more)"]
    (run_dir / "spans" / "decode-0-2.jsonl").unlink()
    assert main(["trace", "r4", "--run-dir", str(run_dir), "--wait", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "the trace is incomplete after 0.2 s: 1 calls wait for their server's span" in err
    (run_dir / TELEMETRY_FILE).write_text(json.dumps({"otlp_endpoint": "collector:4317"}))
    assert main(["trace", "unknown", "--run-dir", str(run_dir), "--wait", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "no span carries request_id 'unknown'" in err and "OTLP to collector:4317" in err
