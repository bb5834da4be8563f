"""What the OpenAI API carries beyond text, end to end: log-probabilities of the sampled tokens
(completions' ``logprobs``, chat's ``logprobs`` + ``top_logprobs``), ``echo`` with the prompt's
log-probabilities (lm-evaluation-harness's log-likelihood requests: ``max_tokens`` 0), ``n``
choices and lists of prompts. The per-token cross-entropy of test-split windows computed through
the API equals ``cmx eval``'s scorer on the same windows, in fp32 and in int8-pasa."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cloudmatrix.checkpoints import load_model
from cloudmatrix.cli.main import main
from cloudmatrix.evaluation.lm import score_windows
from cloudmatrix.evaluation.run import _quantized
from cloudmatrix.evaluation.tokens import load_eval_data
from cloudmatrix.model.precision import PRECISIONS
from cloudmatrix.train.corpus import load_corpus
from tests.services import running_services
from tests.test_gateway import _client, _post

pytestmark = pytest.mark.timeout(300)
WINDOWS, SEQ_LEN = 3, 48


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    """Two gateways, each over a prefill and a decode instance of one die: the float checkpoint in
    fp32, and its `cmx quantize` INT8 checkpoint in int8-pasa. Prefill chunks of 16 tokens, so a
    window's prompt log-probabilities span chunks."""
    run_dir = tmp_path_factory.mktemp("logprobs")
    int8 = run_dir / "tiny-int8"
    assert main(["quantize", "--checkpoint", str(tiny_checkpoint), "--out", str(int8)]) == 0
    served = {"fp32": Path(tiny_checkpoint), "int8-pasa": int8}
    dies = [(f"{tag}-{kind}die", "npu_emulator", ()) for tag in ("f", "q") for kind in ("p", "d")]
    with running_services(run_dir, [("kv", "kvcache", ()), *dies]) as base:
        instances = []
        for tag, precision in (("f", "fp32"), ("q", "int8-pasa")):
            common = (f"checkpoint={served[precision]}", f"precision={precision}", f"kvcache={base['kv'].address}")
            instances += [(f"{tag}-prefill", "prefill", common + (f"dies={base[f'{tag}-pdie'].address}",
                                                                 "chunk_tokens=16")),
                          (f"{tag}-decode", "decode", common + (f"dies={base[f'{tag}-ddie'].address}",))]
        with running_services(run_dir, instances) as inst:
            gateways = [(f"{tag}-gateway", "gateway", (f"checkpoint={served[precision]}",
                                                       f"prefill={inst[f'{tag}-prefill'].address}",
                                                       f"decode={inst[f'{tag}-decode'].address}"))
                        for tag, precision in (("f", "fp32"), ("q", "int8-pasa"))]
            with running_services(run_dir, gateways):
                port = {tag: json.loads((run_dir / "ready" / f"{tag}-gateway.http.json").read_text())["http_port"]
                        for tag in ("f", "q")}
                yield SimpleNamespace(http={"fp32": port["f"], "int8-pasa": port["q"]}, checkpoints=served,
                                      model={p: c.resolve().name for p, c in served.items()})


def _completion(served, precision: str, **body) -> dict:
    status, reply = _post(served.http[precision], "/v1/completions", {"model": served.model[precision], **body})
    assert status == 200, reply
    return reply


@pytest.mark.parametrize("precision", ["fp32", "int8-pasa"])
def test_echoed_prompt_logprobs_give_cmx_evals_cross_entropy(served, tiny_checkpoint, precision):
    data = load_eval_data(Path(tiny_checkpoint), load_corpus(None), SEQ_LEN, WINDOWS, with_train=False)
    model = load_model(tiny_checkpoint)
    if PRECISIONS[precision].int8_weights:
        model = _quantized(Path(tiny_checkpoint), model)
    model.attention.core = PRECISIONS[precision].attention_core
    reference = score_windows(model, data.windows).nll.view(WINDOWS, SEQ_LEN)  # [W, L] nats
    for window, want in zip(data.windows.tolist(), reference):
        reply = _completion(served, precision, prompt=window, echo=True, max_tokens=0, logprobs=0, temperature=0)
        [choice] = reply["choices"]
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == SEQ_LEN + 1
        assert choice["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 0
        got = -torch.tensor(lp["token_logprobs"][1:], dtype=torch.float64)
        print(f"{precision}: API {got.mean():.6f} vs cmx eval {want.mean():.6f} nats/token")
        assert abs(got.mean().item() - want.double().mean().item()) < 1e-3
        assert (got - want.double()).abs().max().item() < 1e-2


def test_completion_logprobs_name_the_sampled_tokens_and_their_alternatives(served):
    reply = _completion(served, "fp32", prompt="def main():", max_tokens=6, logprobs=3, temperature=0,
                        ignore_eos=True)
    lp = reply["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == reply["choices"][0]["text"]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert token in top and top[token] == logprob and len(top) <= 4
        assert logprob == max(top.values()) and logprob <= 0  # greedy: the most likely token
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]


def test_chat_logprobs_carry_bytes_and_top_logprobs(served):
    body = {"model": served.model["fp32"], "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
            "temperature": 0, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    status, reply = _post(served.http["fp32"], "/v1/chat/completions", body)
    assert status == 200, reply
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["logprob"] == entry["logprob"]
        assert math.isclose(sum(math.exp(t["logprob"]) for t in entry["top_logprobs"][:1]), math.exp(entry["logprob"]))
        assert isinstance(entry["bytes"], list)
    status, reply = _post(served.http["fp32"], "/v1/chat/completions", {**body, "logprobs": False})
    assert status == 400 and reply["error"]["param"] == "top_logprobs"


def test_n_choices_and_prompt_lists_are_independent_requests(served):
    single = [_completion(served, "fp32", prompt=p, max_tokens=5, temperature=0, ignore_eos=True)["choices"][0]["text"]
              for p in ("import os", "class A:")]
    both = _completion(served, "fp32", prompt=["import os", "class A:"], max_tokens=5, temperature=0, ignore_eos=True)
    assert [c["text"] for c in both["choices"]] == single and [c["index"] for c in both["choices"]] == [0, 1]
    assert both["usage"]["completion_tokens"] == 10
    sampled = [_completion(served, "fp32", prompt="x =", n=3, max_tokens=8, temperature=1.0, seed=11,
                           ignore_eos=True) for _ in range(2)]
    texts = [[c["text"] for c in reply["choices"]] for reply in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # the same seed again; each choice its own stream
    assert sampled[0]["usage"]["completion_tokens"] == 24 and sampled[0]["usage"]["prompt_tokens"] == \
        _completion(served, "fp32", prompt="x =", max_tokens=1)["usage"]["prompt_tokens"]


def test_a_stream_of_several_choices_names_each_and_adds_up_to_the_whole(served):
    client = _client(served.http["fp32"])
    args = dict(model=served.model["fp32"], prompt="for i in", n=2, max_tokens=6, temperature=1.0, seed=5,
                logprobs=1, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    texts, logprobs = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in client.completions.create(stream=True, **args):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs:
                logprobs[choice.index] += choice.logprobs.token_logprobs
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    for streamed, c in zip((logprobs[0], logprobs[1]), whole.choices):  # steps batch differently: last bits
        assert streamed == pytest.approx(c.logprobs.token_logprobs, abs=1e-4)


def test_echo_returns_the_prompt_and_max_tokens_zero_needs_it(served):
    reply = _completion(served, "fp32", prompt="import sys", echo=True, max_tokens=3, temperature=0, ignore_eos=True)
    assert reply["choices"][0]["text"].startswith("import sys") and reply["usage"]["completion_tokens"] == 3
    status, reply = _post(served.http["fp32"], "/v1/completions",
                          {"model": served.model["fp32"], "prompt": "import sys", "max_tokens": 0})
    assert status == 400 and reply["error"]["param"] == "max_tokens"
