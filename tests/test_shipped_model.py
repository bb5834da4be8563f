"""The trained model that ships in models/cmx-tiny-py: its files are the ones its card hashes,
`cmx eval` reproduces the card's numbers, transformers loads it (ignoring the MTP layer) and agrees
with our model token for token, and its MTP layer quantizes like the others."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from cloudmatrix.checkpoints import load_model
from cloudmatrix.cli.main import main
from cloudmatrix.evaluation.run import EvalSettings, evaluate
from cloudmatrix.model.checkpoint import mtp_prefix
from cloudmatrix.model.generate import generate
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.sampling_params import SamplingParams
from cloudmatrix.train.corpus import load_corpus

MODEL = Path(__file__).resolve().parents[1] / "models" / "cmx-tiny-py"
CARD = MODEL / "README.md"
EVAL = json.loads((MODEL / "eval.json").read_text())
# The same weights and windows on another machine: only summation order may differ.
CE_REL_TOL = 1e-3


def _card_hashes() -> dict[str, str]:
    rows = re.findall(r"^\| `([^`]+)` \| ([0-9a-f]{64}) \|", CARD.read_text(), flags=re.M)
    return dict(rows)


def test_the_files_are_the_ones_the_card_hashes():
    hashes = _card_hashes()
    shipped = {p.name for p in MODEL.iterdir() if p.is_file() and p.name != "README.md"}
    assert set(hashes) == shipped
    for name, digest in hashes.items():
        assert hashlib.sha256((MODEL / name).read_bytes()).hexdigest() == digest, name
    assert sum((MODEL / n).stat().st_size for n in shipped) + CARD.stat().st_size <= 24 * 2**20


def test_the_card_states_what_eval_measured():
    card = CARD.read_text()
    fp32 = EVAL["precisions"]["fp32"]["cross_entropy"]
    assert f"{fp32:.4f}" in card and f"{EVAL['baselines']['kn_trigram']['cross_entropy']:.4f}" in card
    assert f"{EVAL['mtp']['greedy_acceptance']['acceptance']:.4f}" in card


def test_eval_on_a_slice_reproduces_the_cards_fp32_cross_entropy():
    corpus = load_corpus()
    train = json.loads((MODEL / "train.json").read_text())
    assert corpus.differences(train["corpus"]) == [], "this machine's standard library is not the one trained on"
    windows = 4
    report = evaluate(MODEL, EvalSettings(precisions=("fp32",), max_windows=windows, baselines=False,
                                          acceptance_prompts=0), say=lambda line: None)
    expected = sum(EVAL["fp32_window_cross_entropy"][:windows]) / windows
    assert report["precisions"]["fp32"]["cross_entropy"] == pytest.approx(expected, rel=CE_REL_TOL)
    assert report["fp32_window_cross_entropy"] == pytest.approx(EVAL["fp32_window_cross_entropy"][:windows],
                                                                rel=CE_REL_TOL)
    assert report["mtp"]["top1_accuracy_t_plus_2"] > 0.2  # the MTP module has learned too


def _test_text_ids(tokenizer: TextTokenizer, n: int) -> list[int]:
    corpus = load_corpus()
    return tokenizer.encode(corpus.texts("test")[0])[:n]


def test_transformers_loads_it_ignoring_only_the_mtp_layer_and_agrees():
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        MODEL, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    ours = load_model(MODEL)
    prefix = mtp_prefix(ours.cfg)
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all(k.startswith(prefix) for k in info["unexpected_keys"])
    tokenizer = TextTokenizer.load(MODEL)
    ids = torch.tensor([_test_text_ids(tokenizer, 96)])
    with torch.no_grad():
        ref = hf.eval()(ids).logits
    got = ours(ids, torch.arange(ids.shape[1])[None], ours.new_cache())
    assert (got - ref).abs().max().item() <= 1e-3
    prompt = ids[0, :48].tolist()
    mine = list(generate(ours, prompt, SamplingParams(max_tokens=24)))  # up to and including EOS
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.eos_id)[0, 48:].tolist()
    assert len(mine) >= 8 and mine == theirs[:len(mine)]


def test_the_mtp_layer_is_quantized_with_the_others_and_still_agrees(shipped_int8):
    out = shipped_int8
    int8 = load_model(out, mtp=True)
    float_model = load_model(MODEL, mtp=True)
    assert type(int8.mtp[0].eh_proj).__name__ == "Int8Linear"
    assert type(int8.mtp[0].mlp.experts[0].gate_proj).__name__ == "Int8Linear"
    assert (out / "train.json").is_file()  # the INT8 copy says it is a trained model
    tokenizer = TextTokenizer.load(MODEL)
    ids = torch.tensor([_test_text_ids(tokenizer, 128)])
    pos = torch.arange(ids.shape[1])[None]

    def mtp_guess(model):
        kv = model.new_cache()
        with torch.no_grad():
            h = model.hidden_states(ids, pos, kv)
            return model.lm_head(model.mtp_hidden(h[:, :-1], ids[:, 1:], pos[:, :-1], kv)).argmax(-1)

    assert (mtp_guess(int8) == mtp_guess(float_model)).float().mean() >= 0.9


def test_cmx_eplb_balances_the_measured_expert_load(capsys):
    load = json.loads((MODEL / "expert_load.json").read_text())
    assert load["layers"] == [1, 2, 3] and all(len(row) == 16 for row in load["token_counts"])
    assert main(["eplb", "--stats", str(MODEL / "expert_load.json"), "--dies", "4", "--redundant", "4"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["mean"]]
    before, after = float(rows[0][1]), float(rows[0][2])
    assert after < before
