"""Faults against real processes, bounded in time: a decode instance SIGKILLed mid-stream hands its
request to the other decode instance (request migration) and the client gets exactly the local
engine's tokens, none twice, none missing; with no decode instance left the request fails fast and
clearly instead of hanging."""
from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import openai
import pytest

from cloudmatrix.clients import DecodeClient
from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.processes import is_alive, load_state
from cloudmatrix.launcher.topology import parse_topology
from cloudmatrix.model.generate import generate
from cloudmatrix.model.precision import load_for_precision, parse_precision
from cloudmatrix.model.sampling import SamplingParams
from cloudmatrix.model.tokenizer import TextTokenizer

pytestmark = pytest.mark.timeout(300)
PROMPT = "Request migration keeps every token of a stream whose decode instance died"


def _topology(checkpoint: Path):
    common = {"checkpoint": str(checkpoint), "precision": "fp32", "kvcache": "{addresses:kvcache}"}
    return parse_topology({"name": "two-decodes", "services": [
        {"name": "kvcache", "service": "kvcache", "count": 2},
        {"name": "pdie", "service": "npu_emulator"}, {"name": "adie", "service": "npu_emulator"},
        {"name": "bdie", "service": "npu_emulator"},
        {"name": "prefill", "service": "prefill", "set": {**common, "dies": "{addresses:pdie}"}},
        {"name": "decode-a", "service": "decode", "set": {**common, "dies": "{addresses:adie}", "instance_id": "a"}},
        {"name": "decode-b", "service": "decode", "set": {**common, "dies": "{addresses:bdie}", "instance_id": "b"}},
        {"name": "gateway", "service": "gateway", "set": {
            "checkpoint": str(checkpoint), "prefill": "{addresses:prefill}",
            "decode": "{addresses:decode-a},{addresses:decode-b}"}}]}, Path("."))


@pytest.fixture(scope="module")
def two_decodes(tmp_path_factory, tiny_checkpoint):
    run_dir = tmp_path_factory.mktemp("two-decodes")
    records = bring_up(_topology(Path(tiny_checkpoint)), run_dir, 180.0)
    try:
        port = json.loads((run_dir / "ready" / "gateway-0.http.json").read_text())["http_port"]
        yield run_dir, {r.name: r for r in records}, f"http://127.0.0.1:{port}/v1"
    finally:
        bring_down(run_dir, grace_s=5.0)


def _running(address: str) -> int:
    async def load():
        async with DecodeClient(address) as client:
            return (await client.load(deadline_s=5.0)).running

    return asyncio.run(load())


def test_a_decode_instance_killed_after_20_tokens_and_the_stream_completes_on_the_other(two_decodes,
                                                                                         tiny_checkpoint):
    run_dir, records, url = two_decodes
    tokenizer = TextTokenizer.load(tiny_checkpoint)
    model = load_for_precision(tiny_checkpoint, parse_precision("fp32"))
    expected = tokenizer.decode(list(generate(model, tokenizer.encode(PROMPT), SamplingParams(max_tokens=64),
                                              ignore_eos=True)))
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    stream = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=64,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    text, chunks, usage, killed = "", 0, None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            text += chunk.choices[0].text
            chunks += 1
        usage = chunk.usage or usage
        if chunks == 20 and killed is None:  # the instance serving the stream dies now
            killed = next(r for name, r in records.items() if name.startswith("decode") and _running(r.address))
            os.kill(killed.pid, signal.SIGKILL)
    assert killed is not None and not is_alive(killed)
    assert usage.completion_tokens == 64
    assert text == expected  # every token once, in order, as the local engine makes them
    gateway_log = Path(records["gateway-0"].log).read_text()
    assert "migrating the request" in gateway_log


def test_with_no_decode_instance_left_a_request_fails_fast_and_clearly(two_decodes):
    run_dir, records, url = two_decodes
    for record in load_state(run_dir):
        if record.service == "decode" and is_alive(record):
            os.kill(record.pid, signal.SIGKILL)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as failed:
        client.completions.create(model=client.models.list().data[0].id, prompt="Nobody decodes this",
                                  max_tokens=8, temperature=0)
    assert failed.value.status_code == 503 and failed.value.body["code"] == "instance_unavailable"
    assert "127.0.0.1" not in failed.value.body["message"]  # the instance's words, never its address
