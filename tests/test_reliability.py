"""Faults against real processes, bounded in time: a decode instance SIGKILLed mid-stream (one
stream, then under the benchmark client's load) or frozen (SIGSTOP, found by keepalive) hands its
requests to the other decode instance (request migration) and each client gets exactly the local
engine's tokens, none twice, none missing; a killed prefill instance is left out; a burst of ten
times capacity is shed with 429; SIGTERM makes the gateway refuse new HTTP connections at
once while it finishes the stream in flight; with no decode instance left a request fails fast and
clearly instead of hanging."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from cloudmatrix.bench.serve.runner import LoadShape, run_load
from cloudmatrix.bench.serve.workload import BenchRequest
from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.processes import is_alive, load_state, replace_record, spawn, wait_healthy
from cloudmatrix.launcher.topology import parse_topology
from cloudmatrix.launcher.waves import resolve
from cloudmatrix.model.generate import generate
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.sampling_params import SamplingParams
from tests.metrics_text import scrape, value
from tests.services import decode_running
from tests.waiting import rss_mb, wait_for

pytestmark = pytest.mark.timeout(300)
PROMPT = "Request migration keeps every token of a stream whose decode instance died"
CAPACITY = 8  # the gateway's requests running + waiting


def _topology(checkpoint: Path):
    common = {"checkpoint": str(checkpoint), "precision": "fp32", "kvcache": "{addresses:kvcache}"}
    return parse_topology({"name": "two-decodes", "services": [
        {"name": "kvcache", "service": "kvcache", "count": 2},
        {"name": "pdie", "service": "npu_emulator"}, {"name": "qdie", "service": "npu_emulator"},
        {"name": "adie", "service": "npu_emulator"}, {"name": "bdie", "service": "npu_emulator"},
        {"name": "prefill", "service": "prefill", "set": {**common, "dies": "{addresses:pdie}", "instance_id": "p"}},
        {"name": "prefill-q", "service": "prefill", "set": {**common, "dies": "{addresses:qdie}", "instance_id": "q"}},
        {"name": "decode-a", "service": "decode", "set": {**common, "dies": "{addresses:adie}", "instance_id": "a"}},
        {"name": "decode-b", "service": "decode", "set": {**common, "dies": "{addresses:bdie}", "instance_id": "b"}},
        {"name": "gateway", "service": "gateway", "set": {
            "checkpoint": str(checkpoint), "prefill": "{addresses:prefill},{addresses:prefill-q}", "server.grace_s": 60,
            "max_in_flight": CAPACITY // 2, "max_queue": CAPACITY // 2,
            "decode": "{addresses:decode-a},{addresses:decode-b}"}}]}, Path("."))


@pytest.fixture(scope="module")
def two_decodes(tmp_path_factory, tiny_checkpoint):
    run_dir = tmp_path_factory.mktemp("two-decodes")
    topology = _topology(Path(tiny_checkpoint))
    records = bring_up(topology, run_dir, 180.0)
    try:
        yield run_dir, {r.name: r for r in records}, topology
    finally:
        bring_down(run_dir, grace_s=5.0)


def _http_port(run_dir: Path) -> int:
    return json.loads((run_dir / "ready" / "gateway-0.http.json").read_text())["http_port"]


def _client(run_dir: Path, timeout_s: float = 120.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{_http_port(run_dir)}/v1", api_key="unused", max_retries=0,
                         timeout=timeout_s)


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except OSError:
        return True
    return False


def _stream(client: openai.OpenAI, prompt: str, max_tokens: int):
    return client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, stream=True, stream_options={"include_usage": True},
                                     extra_body={"ignore_eos": True})


def test_a_decode_instance_killed_after_20_tokens_and_the_stream_completes_on_the_other(two_decodes,
                                                                                         tiny_checkpoint):
    run_dir, records, _ = two_decodes
    tokenizer = TextTokenizer.load(tiny_checkpoint)
    model = load_for_precision(tiny_checkpoint, parse_precision("fp32"))
    expected = tokenizer.decode(list(generate(model, tokenizer.encode(PROMPT), SamplingParams(max_tokens=64),
                                              ignore_eos=True)))
    stream = _stream(_client(run_dir), PROMPT, 64)
    text, chunks, usage, killed = "", 0, None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            text += chunk.choices[0].text
            chunks += 1
        usage = chunk.usage or usage
        if chunks == 20 and killed is None:  # the instance serving the stream dies now
            killed = next(r for name, r in records.items() if name.startswith("decode") and decode_running(r.address))
            os.kill(killed.pid, signal.SIGKILL)
    assert killed is not None and not is_alive(killed)
    assert usage.completion_tokens == 64
    assert text == expected  # every token once, in order, as the local engine makes them
    gateway_log = Path(records["gateway-0"].log).read_text()
    assert "migrating the request" in gateway_log


def _respawn(run_dir: Path, topology, name: str) -> None:
    """Start the dead process ``name`` again on its old address (its peers were given that one),
    recorded so that the fixture stops it."""
    old = next(r for r in load_state(run_dir) if r.name == name)
    spec = next(p for p in topology.processes if p.name == name)
    proc, record = spawn(dataclasses.replace(resolve(spec, load_state(run_dir)), port=old.port), run_dir)
    replace_record(run_dir, record)  # (stopped by the fixture even if it never turns SERVING)
    wait_healthy([(proc, record)], health_check_sync, 120.0)
    replace_record(run_dir, record)  # with its reported ports


def _both_decodes(run_dir: Path, topology) -> list:
    """The two decode instances' records, either one restarted first if it is dead."""
    for record in load_state(run_dir):
        if record.service == "decode" and not is_alive(record):
            _respawn(run_dir, topology, record.name)
    return [r for r in load_state(run_dir) if r.service == "decode"]


def _steps(decode) -> float:
    """Steps the decode instance has run (its step histogram's count)."""
    return value(scrape(decode.metrics_port), "cmx_engine_step_seconds_count")


def _migrations(run_dir: Path) -> int:
    return Path(next(r for r in load_state(run_dir) if r.name == "gateway-0").log).read_text().count(
        "migrating the request")


def test_a_decode_instance_killed_under_benchmark_load_and_every_request_gets_the_local_engines_tokens(
        two_decodes, tiny_checkpoint):
    """16 greedy requests of 96 tokens from the benchmark client, 8 at a time; one decode instance is
    SIGKILLed while both run requests: every request completes, each with the local engine's text."""
    run_dir, _, topology = two_decodes
    decodes, migrations = _both_decodes(run_dir, topology), _migrations(run_dir)
    tokenizer = TextTokenizer.load(tiny_checkpoint)
    model = load_for_precision(tiny_checkpoint, parse_precision("fp32"))
    requests = [BenchRequest(tokenizer.encode(f"Load {i}: the decode tier loses an instance"), 96) for i in range(16)]
    expected = [tokenizer.decode(list(generate(model, r.prompt, SamplingParams(max_tokens=96), ignore_eos=True)))
                for r in requests]
    url = f"http://127.0.0.1:{_http_port(run_dir)}"
    load = lambda: asyncio.run(run_load(url, _client(run_dir).models.list().data[0].id, requests,  # noqa: E731
                                        LoadShape(concurrency=8), timeout_s=240.0))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(load)
        assert wait_for(lambda: all(decode_running(d.address) >= 1 for d in decodes), timeout_s=120.0)
        # killed mid-stream: once it has run steps since this test's requests reached it (a request
        # that has streamed no token yet is retried elsewhere, not migrated) and still runs two
        victim = decodes[0]
        steps = _steps(victim)
        assert wait_for(lambda: _steps(victim) >= steps + 8 and decode_running(victim.address) >= 2, timeout_s=120.0)
        os.kill(victim.pid, signal.SIGKILL)
        results, _ = running.result()
    assert [r.error for r in results] == [""] * len(requests)  # every request completed ...
    assert [r.output_tokens for r in results] == [96] * len(requests)
    assert [r.text for r in results] == expected  # ... with every token once, in order
    assert _migrations(run_dir) > migrations


def test_a_frozen_decode_instance_is_found_by_keepalive_and_its_seeded_stream_migrates(two_decodes,
                                                                                        tiny_checkpoint):
    """SIGSTOP (no FIN, no RST: a silent peer) of the instance serving a seeded sampled stream: the
    gateway's keepalive ping goes unanswered, the call fails, the request migrates, and the client
    gets the local engine's tokens for that seed (sampling is a function of seed and position)."""
    run_dir, _, topology = two_decodes
    decodes, migrations = _both_decodes(run_dir, topology), _migrations(run_dir)
    tokenizer = TextTokenizer.load(tiny_checkpoint)
    model = load_for_precision(tiny_checkpoint, parse_precision("fp32"))
    sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=48)
    expected = tokenizer.decode(list(generate(model, tokenizer.encode(PROMPT), sampling, ignore_eos=True)))
    client = _client(run_dir)
    stream = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=48,
                                       temperature=0.8, top_p=0.95, seed=7, stream=True,
                                       extra_body={"ignore_eos": True})
    text, chunks, frozen = "", 0, None
    try:
        for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
            chunks += 1
            if chunks == 10 and frozen is None:
                frozen = next(d for d in decodes if decode_running(d.address))
                os.kill(frozen.pid, signal.SIGSTOP)
    finally:
        if frozen is not None:
            os.kill(frozen.pid, signal.SIGKILL)  # (SIGKILL ends a stopped process too)
    assert frozen is not None and text == expected
    assert _migrations(run_dir) == migrations + 1


def test_a_killed_prefill_instance_is_left_out_and_every_request_is_served_by_the_other(two_decodes):
    run_dir, records, _ = two_decodes
    os.kill(records["prefill-0"].pid, signal.SIGKILL)
    client = _client(run_dir)
    model = client.models.list().data[0].id
    for i in range(4):  # the first may hit the dead instance: the gateway retries it on the other
        completion = client.completions.create(model=model, prompt=f"Prefill failover {i}", max_tokens=2,
                                               temperature=0)
        assert completion.usage.completion_tokens == 2
    assert not is_alive(records["prefill-0"]) and is_alive(records["prefill-q-0"])


def _post(port: int, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def test_a_burst_of_ten_times_capacity_is_shed_with_429_and_retry_after_and_memory_stays_bounded(two_decodes):
    run_dir, _, _ = two_decodes
    processes = [r for r in load_state(run_dir) if is_alive(r)]
    before = {r.name: rss_mb(r.pid) for r in processes}
    body = {"model": _client(run_dir).models.list().data[0].id, "prompt": "Overload", "max_tokens": 4,
            "temperature": 0}
    with ThreadPoolExecutor(10 * CAPACITY) as pool:
        answers = list(pool.map(lambda _: _post(_http_port(run_dir), body), range(10 * CAPACITY)))
    during = {r.name: rss_mb(r.pid) for r in processes}
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= CAPACITY and statuses.count(429) > 0, statuses
    for status, headers, reply in answers:
        if status == 429:
            assert headers["Retry-After"] == "1" and reply["error"]["code"] == "rate_limit_exceeded"
        else:
            assert reply["usage"]["completion_tokens"] == 4  # admitted requests are served in full
    assert _post(_http_port(run_dir), body)[0] == 200  # and the gateway serves on
    after = {r.name: rss_mb(r.pid) for r in processes}
    growth = max(during[n] - before[n] for n in before), max(after[n] - before[n] for n in before)
    print(f"burst of {10 * CAPACITY}: {statuses.count(200)} served, {statuses.count(429)} shed; largest RSS growth "
          f"{growth[0]:.0f} MB during, {growth[1]:.0f} MB after")  # docs/reliability.md
    for name in before:  # no process grew by more than 200 MB under the burst, or kept it
        assert during[name] - before[name] < 200 and after[name] - before[name] < 200, (name, before, during, after)


def test_sigterm_makes_the_gateway_refuse_new_http_at_once_and_finish_the_stream_in_flight(two_decodes):
    run_dir, records, topology = two_decodes
    gateway, port = records["gateway-0"], _http_port(run_dir)
    stream = iter(_stream(_client(run_dir), "A stream that outlives its gateway's SIGTERM", 160))
    first = [next(stream) for _ in range(3)]
    os.kill(gateway.pid, signal.SIGTERM)
    assert wait_for(lambda: _refuses(port), timeout_s=30.0)  # new connections refused at once...
    decode = next(r for r in load_state(run_dir) if r.service == "decode" and is_alive(r))
    assert decode_running(decode.address) == 1  # (the request is still in flight)
    rest = list(stream)                                   # ... while the request in flight streams on
    usage = next(c.usage for c in reversed(first + rest) if c.usage)
    assert usage.completion_tokens == 160
    assert wait_for(lambda: not is_alive(gateway), timeout_s=60.0)  # then it exits by itself
    _respawn(run_dir, topology, "gateway-0")  # a new gateway for the next test


def test_with_no_decode_instance_left_a_request_fails_fast_and_clearly(two_decodes):
    run_dir, _, _ = two_decodes
    for record in load_state(run_dir):
        if record.service == "decode" and is_alive(record):
            os.kill(record.pid, signal.SIGKILL)
    client = _client(run_dir, timeout_s=60.0)
    with pytest.raises(openai.APIStatusError) as failed:
        client.completions.create(model=client.models.list().data[0].id, prompt="Nobody decodes this",
                                  max_tokens=8, temperature=0)
    assert failed.value.status_code == 503 and failed.value.body["code"] == "instance_unavailable"
    assert "127.0.0.1" not in failed.value.body["message"]  # the instance's words, never its address
