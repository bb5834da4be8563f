"""The gateway in front of a real serving stack: the openai client, greedy text equal to the local
engine, stop strings, 400s that name the field, 401 without a key, gRPC Generate, /metrics, and a
client leaving mid-stream freeing the decode's blocks; plus its pure parts without processes."""
from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import openai
import pytest

from cloudmatrix.checkpoints import load_model
from cloudmatrix.cli.main import main
from cloudmatrix.clients import CallError, ClientOptions, GatewayClient
from cloudmatrix.model.generate import generate
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.rpc.errors import ResourceExhausted
from cloudmatrix.sampling_params import DEFAULT_MAX_TOKENS, SamplingParams
from cmx.common.v1 import common_pb2
from cmx.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.admission import Admission
from services.gateway.chat import render
from services.gateway.text import OutputText
from tests.metrics_text import samples, scrape, types, value
from tests.services import running_services
from tests.test_decode import _load, _wait_for, _wait_until_idle, serving_stack

pytestmark = pytest.mark.timeout(300)
HISTOGRAMS = ("time_to_first_token_seconds", "time_to_first_token_modeled_seconds",
              "time_to_first_token_phase_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_prompt_tokens", "request_generation_tokens")
COUNTERS = ("prompt_tokens", "prompt_tokens_cached", "generation_tokens", "requests")
GAUGES = ("num_requests_running", "num_requests_waiting")


@pytest.fixture(scope="module")
def gw(tmp_path_factory, tiny_checkpoint):
    run_dir = tmp_path_factory.mktemp("gateway")
    with serving_stack(run_dir, tiny_checkpoint) as (prefill, decode, decode_dies):
        sets = (f"checkpoint={tiny_checkpoint}", f"prefill={prefill}", f"decode={decode}")
        dead = (f"checkpoint={tiny_checkpoint}", "prefill=127.0.0.1:1", "decode=127.0.0.1:1")
        specs = [("gateway", "gateway", sets), ("gateway-auth", "gateway", sets + ("api_keys=k1,k2",)),
                 ("gateway-one", "gateway", sets + ("max_in_flight=1", "max_queue=0", "request_timeout_s=2")),
                 ("gateway-dead", "gateway", dead)]
        with running_services(run_dir, specs) as g:
            port = {n: json.loads((run_dir / "ready" / f"{n}.http.json").read_text())["http_port"] for n in g}
            yield SimpleNamespace(http=port["gateway"], auth_http=port["gateway-auth"], one_http=port["gateway-one"],
                                  dead_http=port["gateway-dead"], grpc=g["gateway"].address,
                                  auth_grpc=g["gateway-auth"].address,
                                  model=Path(tiny_checkpoint).resolve().name, decode=decode)


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    tokenizer, model = TextTokenizer.load(tiny_checkpoint), load_model(tiny_checkpoint)
    return lambda ids, n: tokenizer.decode(list(generate(model, ids, SamplingParams(max_tokens=n)))), tokenizer


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)


def _post(port: int, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_openai_completion_equals_the_local_engine(gw, local):
    run, tokenizer = local
    prompt = "The supernode serves"
    reply = _client(gw.http).completions.create(model=gw.model, prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == run(tokenizer.encode(prompt), 8)
    assert [m.id for m in _client(gw.http).models.list()] == [gw.model]
    assert _client(gw.http).models.list().data[0].trained is False  # a random-init checkpoint
    assert reply.id.startswith("cmpl-") and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt)) and 1 <= reply.usage.completion_tokens <= 8


def test_openai_streamed_chat_equals_the_local_engine(gw, local):
    run, tokenizer = local
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do experts live?"}]
    chunks = list(_client(gw.http).chat.completions.create(
        model=gw.model, messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == run(tokenizer.encode(render(messages), add_bos=False), 6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_a_stop_string_cuts_the_text(gw, local):
    run, tokenizer = local
    ids = tokenizer.encode("Prefill and decode")
    full = run(ids, 24)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    status, body = _post(gw.http, "/v1/completions", {"model": gw.model, "prompt": ids, "max_tokens": 24,
                                                      "temperature": 0, "stop": [stop]})
    assert status == 200 and body["choices"][0] == {"index": 0, "text": full[:full.index(stop)], "logprobs": None,
                                                    "finish_reason": "stop"}


@pytest.mark.parametrize("change, param, words", [
    ({"model": "no-such-model"}, "model", "unknown model"),
    ({"max_tokens": -3}, "max_tokens", ">= 1"),
    ({"prompt": [7] * 2100}, "prompt", "context of 2048"),
    ({"max_tokens": 2047}, "max_tokens", "context of 2048"),
    ({"best_of": 3}, "best_of", "best_of = 1"),
    ({"suffix": "tail"}, "suffix", "not supported"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "json_object"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"tool_choice": "required"}, "tool_choice", "not supported"),
])
def test_bad_requests_get_a_400_naming_the_field(gw, change, param, words):
    status, body = _post(gw.http, "/v1/completions", {"model": gw.model, "prompt": "Hello", **change})
    assert status == 400 and body["error"]["param"] == param and words in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


def test_neutral_values_of_unimplemented_fields_are_accepted(gw):
    status, body = _post(gw.http, "/v1/chat/completions", {
        "model": gw.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "tools": [],
        "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}, "top_logprobs": 0})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_the_developer_role_is_the_system_prompt(gw):
    def answer(role: str) -> str:
        reply = _client(gw.http).chat.completions.create(
            model=gw.model, messages=[{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            max_tokens=6, temperature=0)
        return reply.choices[0].message.content

    assert answer("developer") == answer("system")


def test_models_retrieve_and_json_errors_for_every_status(gw):
    client = _client(gw.http)
    assert client.models.retrieve(gw.model).id == gw.model
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    cases = [("GET", "/v1/no-such-endpoint", None, 404, "not_found"),
             ("GET", "/v1/completions", None, 405, "method_not_allowed"),
             ("POST", "/v1/completions", b"x" * (3 * 2**20), 413, "request_too_large")]
    for method, path, data, status, code in cases:
        request = urllib.request.Request(f"http://127.0.0.1:{gw.http}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(request, timeout=60)
        assert failure.value.code == status and failure.value.headers["Content-Type"].startswith("application/json")
        error = json.loads(failure.value.read())["error"]
        assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
        if status == 405:
            assert "POST" in failure.value.headers["Allow"]


def test_a_missing_or_wrong_api_key_gets_401(gw):
    body = {"model": gw.model, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}):
        status, reply = _post(gw.auth_http, "/v1/completions", body, headers)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    status, reply = _post(gw.auth_http, "/v1/completions", body, {"Authorization": "Bearer k2"})
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1


def test_the_grpc_api_checks_the_api_key_too(gw):
    async def scenario(metadata):
        async with GatewayClient(gw.auth_grpc, ClientOptions(metadata=metadata, retries=0)) as client:
            return await client.list_models()

    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "k1"),)):
        with pytest.raises(CallError) as refused:
            asyncio.run(scenario(metadata))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "k1" not in str(refused.value)
    assert asyncio.run(scenario((("authorization", "Bearer k1"),)))[0].id == gw.model


def test_over_capacity_429_past_the_deadline_504_no_instance_503(gw):
    long = {"model": gw.model, "prompt": "Slow", "max_tokens": 1500, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(_post, gw.one_http, "/v1/completions", long)
        assert _wait_for(lambda: value(scrape(gw.one_http), "cmx_num_requests_running") == 1)
        status, body = _post(gw.one_http, "/v1/completions", {**long, "max_tokens": 2})
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        status, body = first.result()
    assert status == 504 and body["error"]["type"] == "timeout_error"
    status, body = _post(gw.dead_http, "/v1/completions", {**long, "max_tokens": 2})
    assert status == 503 and "prefill" in body["error"]["message"]


def test_grpc_generate_streams(gw, local):
    _, tokenizer = local
    request = gateway_pb2.GenerateRequest(model=gw.model, text="Dispatch and combine", stream=True,
                                          sampling=common_pb2.SamplingParams(max_tokens=10, ignore_eos=True))
    with grpc.insecure_channel(gw.grpc) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        chunks = list(stub.Generate(request, timeout=120))
        models = stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10).models
    ids = [t for c in chunks for t in c.token_ids]
    assert len(chunks) >= 10 and len(ids) == 10 and chunks[-1].usage.completion_tokens == 10
    assert "".join(c.text for c in chunks) == tokenizer.decode(ids)
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [p.phase for p in chunks[-1].timing.phases] == ["queue", "cache_load", "prefill", "decode"]
    assert chunks[-1].timing.modeled_s > 0 and models[0].id == gw.model and models[0].max_context_tokens == 2048


def test_an_unset_max_tokens_means_the_same_on_every_path(gw, tiny_checkpoint, capsys):
    """OpenAI completions, the gateway's gRPC Generate and `cmx generate`, none given max_tokens:
    DEFAULT_MAX_TOKENS greedy tokens each, the same text (the random tiny model stops at EOS
    only by chance, and it does not in these 16 tokens)."""
    prompt = "An unset max_tokens"
    status, body = _post(gw.http, "/v1/completions", {"model": gw.model, "prompt": prompt, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    request = gateway_pb2.GenerateRequest(model=gw.model, text=prompt, sampling=common_pb2.SamplingParams())
    with grpc.insecure_channel(gw.grpc) as channel:
        chunks = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120))
    assert chunks[-1].usage.completion_tokens == DEFAULT_MAX_TOKENS
    assert "".join(c.text for c in chunks) == body["choices"][0]["text"]
    capsys.readouterr()
    assert main(["generate", "--local", "--checkpoint", str(tiny_checkpoint), prompt]) == 0
    out, err = capsys.readouterr()
    assert f"[{DEFAULT_MAX_TOKENS} tokens in" in err and out == prompt + body["choices"][0]["text"] + "\n"


def test_metrics_expose_the_cmx_series_typed_with_model_name(gw):
    before = scrape(gw.http)
    _client(gw.http).completions.create(model=gw.model, prompt="Metrics", max_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True})
    status, _ = _post(gw.http, "/v1/completions", {"model": gw.model, "prompt": "x", "max_tokens": -1})
    assert status == 400
    text, kinds = scrape(gw.http), types(scrape(gw.http))
    expected = {**dict.fromkeys(HISTOGRAMS, "histogram"), **dict.fromkeys(COUNTERS, "counter"),
                **dict.fromkeys(GAUGES, "gauge")}
    assert {name: kinds.get(f"cmx_{name}") for name in expected} == {name: t for name, t in expected.items()}
    assert all(labels.get("model_name") == gw.model for name in GAUGES for labels, _ in samples(text, f"cmx_{name}"))

    def delta(name: str, **labels: str) -> float:
        return value(text, name, model_name=gw.model, **labels) - value(before, name, model_name=gw.model, **labels)

    assert delta("cmx_time_to_first_token_seconds_count") == 1 and delta("cmx_generation_tokens_total") == 3
    assert delta("cmx_request_generation_tokens_sum") == 3 and delta("cmx_prompt_tokens_total") > 0
    assert delta("cmx_requests_total", finish_reason="length") == 1
    assert delta("cmx_requests_total", finish_reason="invalid") == 1  # the 400 is counted
    assert "cmx_prefix_cache_queries" not in kinds  # counted once, by the prefill instances
    assert not any(":" in name for name in kinds)  # colons are for recording rules


def test_a_client_leaving_mid_stream_frees_the_decode_blocks(gw):
    idle = list(_wait_until_idle(gw.decode).die_kv_blocks_free)
    connection = http.client.HTTPConnection("127.0.0.1", gw.http, timeout=120)
    connection.request("POST", "/v1/completions", json.dumps({
        "model": gw.model, "prompt": "A long answer", "max_tokens": 1500, "ignore_eos": True, "stream": True}),
        {"Content-Type": "application/json"})
    response = connection.getresponse()
    lines = [response.readline() for _ in range(8)]  # four data events (each ends with a blank line)
    busy = list(_load(gw.decode).die_kv_blocks_free)
    connection.close()
    assert response.status == 200 and all(line.startswith(b"data: ") for line in lines[::2])
    assert sum(busy) < sum(idle)
    assert _wait_for(lambda: list(_load(gw.decode).die_kv_blocks_free) == idle)


def test_stop_strings_are_held_back_until_decided(local):
    _, tokenizer = local
    ids = tokenizer.encode("one two three four", add_bos=False)
    out = OutputText(tokenizer, ("three",))
    text = "".join(out.push(t) for t in ids) + out.flush()
    assert text == "one two " and out.stopped
    out = OutputText(tokenizer, ("thrice",))
    assert "".join(out.push(t) for t in ids) + out.flush() == "one two three four"


def test_admission_refuses_beyond_the_queue():
    async def scenario():
        admission = Admission(max_in_flight=1, max_queue=1)
        async with admission.slot(1.0):
            waiter = asyncio.create_task(_hold(admission))
            await asyncio.sleep(0.01)
            assert (admission.running, admission.waiting) == (1, 1)
            with pytest.raises(ResourceExhausted):
                async with admission.slot(1.0):
                    pass
        await waiter
        with pytest.raises(TimeoutError):
            async with admission.slot(1.0):
                await _hold(admission, timeout_s=0.05)

    asyncio.run(scenario())


async def _hold(admission: Admission, timeout_s: float = 1.0) -> None:
    async with admission.slot(timeout_s):
        await asyncio.sleep(0.01)


def test_chat_template_matches_the_checkpoint_template(tiny_checkpoint):
    jinja2 = pytest.importorskip("jinja2")
    config = json.loads((Path(tiny_checkpoint) / "tokenizer_config.json").read_text())
    messages = [{"role": "system", "content": "S"}, {"role": "developer", "content": "D"},
                {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "U2"}]
    expected = jinja2.Template(config["chat_template"]).render(
        messages=messages, bos_token=config["bos_token"], eos_token=config["eos_token"], add_generation_prompt=True)
    assert render(messages) == expected
