"""`cmx train`: the loop lowers the loss, resumes bit for bit, balances experts without an
auxiliary loss, and its MTP loss is the cross-entropy of t_{i+2} computed independently."""
from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cloudmatrix.cli.main import main
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.model.moe import Router
from cloudmatrix.model.presets import PRESETS
from cloudmatrix.train.corpus import load_corpus
from cloudmatrix.train.model_init import new_model
from cloudmatrix.train.objective import RouterTap, compute_losses, update_correction_bias
from cloudmatrix.train.settings import TrainSettings
from cloudmatrix.train.trainer import Trainer, max_violation
from tests.train_corpus import write_corpus

SMALL = dict(seq_len=64, batch_size=4, threads=1, log_every=1, eval_every=1000, eval_windows=2,
             warmup_steps=5, lr=3e-3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _trainer(out, corpus, steps: int, **kw) -> Trainer:
    settings = TrainSettings(tokens=steps * SMALL["seq_len"] * SMALL["batch_size"], **{**SMALL, **kw})
    return Trainer(settings, out, corpus_root=corpus, say=lambda line: None)


def test_the_corpus_split_is_by_file_and_recorded(corpus):
    c = load_corpus(corpus)
    assert {k: len(v) for k, v in c.files.items()} == {"train": 12, "validation": 2, "test": 2}
    assert not set(c.files["train"]) & (set(c.files["test"]) | set(c.files["validation"]))
    assert c.differences(c.metadata()) == []
    (corpus / "pkg" / "extra_file_0.py").write_text("x = 1\n")
    try:
        assert "file list differs" in " ".join(load_corpus(corpus).differences(c.metadata()))
    finally:
        (corpus / "pkg" / "extra_file_0.py").unlink()


def test_a_few_steps_lower_the_loss(tmp_path, corpus):
    report = _trainer(tmp_path, corpus, steps=40).run()
    losses = [p["lm"] for p in report["curve"]["train"]]
    assert losses[0] > math.log(4096) - 0.5  # a fresh model is near uniform
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.5
    assert report["final"]["validation"]["lm"] < losses[0] - 1.0
    assert all(p["mtp"] is not None for p in report["curve"]["train"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train.json", "loss.png"):
        assert (tmp_path / name).is_file(), name


def test_resume_continues_from_the_same_state(tmp_path, corpus):
    whole = _trainer(tmp_path / "whole", corpus, steps=8).run()
    _trainer(tmp_path / "split", corpus, steps=8).run(stop_after_steps=3)
    resumed = _trainer(tmp_path / "split", corpus, steps=8)
    assert resumed.step == 3
    report = resumed.run()
    assert [p["lm"] for p in report["curve"]["train"]] == [p["lm"] for p in whole["curve"]["train"]]
    a = load_file(str(tmp_path / "whole" / "train_state" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "train_state" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path, corpus):
    _trainer(tmp_path, corpus, steps=4).run(stop_after_steps=1)
    with pytest.raises(ValueError, match="other settings"):
        _trainer(tmp_path, corpus, steps=4, lr=1e-3)


def test_a_continued_run_starts_from_the_checkpoint(tmp_path, corpus):
    first = _trainer(tmp_path / "first", corpus, steps=6, export_dtype="float32").run()
    more = _trainer(tmp_path / "more", corpus, steps=2, seed=1, init_from=str(tmp_path / "first"))
    saved = load_file(str(tmp_path / "first" / "train_state" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in more.model.state_dict().items())
    assert more.model.training and more.step == 0
    tok = "tokenizer.json"
    assert (tmp_path / "more" / tok).read_bytes() == (tmp_path / "first" / tok).read_bytes()
    report = more.run()
    assert report["init_from"]["steps"] == first["steps"] == 6
    assert report["init_from"]["model_sha256"] == hashlib.sha256(
        (tmp_path / "first" / "model.safetensors").read_bytes()).hexdigest()


def test_the_bias_update_balances_a_skewed_router():
    cfg = dataclasses.replace(PRESETS["tiny-py"], n_group=1, topk_group=1)
    holder = torch.nn.Module()
    holder.gate = Router(cfg)
    gen = torch.Generator().manual_seed(3)
    torch.nn.init.normal_(holder.gate.weight, std=0.05, generator=gen)
    with torch.no_grad():
        holder.gate.weight[:3] += 0.4  # experts 0-2 score high for every token of this input
    x = torch.randn(512, cfg.hidden_size, generator=gen).abs()
    tap = RouterTap(holder)

    def load() -> torch.Tensor:
        tap.reset()
        return torch.bincount(holder.gate(x).expert_ids.flatten(), minlength=cfg.n_routed_experts)[None]

    before = load()
    assert max_violation(before) > 1.5
    for _ in range(200):
        update_correction_bias(tap, load(), speed=0.01)
    after = load()
    assert max_violation(after) < 0.5 * max_violation(before)
    assert (holder.gate.e_score_correction_bias[:3] < 0).all()  # overloaded experts pushed down


def _small_model(seed: int):
    cfg: ModelConfig = dataclasses.replace(PRESETS["tiny-py"], vocab_size=512)
    return new_model(cfg, std=0.1, seed=seed).eval()


@pytest.mark.parametrize("seed", [1, 2])
def test_the_mtp_loss_is_the_cross_entropy_of_t_plus_2(seed):
    """Reference: token by token with the latent cache (the absorbed decode path), the MTP module
    reading h_i and t_{i+1} at position i, scored against t_{i+2} by an explicit log-softmax."""
    model = _small_model(seed)
    window = torch.randint(3, 512, (2, 18), generator=torch.Generator().manual_seed(seed))  # [B, L + 1]
    with torch.no_grad():
        losses = compute_losses(model, RouterTap(model), window)
        kv, hidden = model.new_cache(), []
        for i in range(window.shape[1] - 1):
            hidden.append(model.hidden_states(window[:, i:i + 1], torch.full((2, 1), i), kv))
        lm_ref, mtp_ref = [], []
        for i in range(window.shape[1] - 1):
            logp = model.lm_head(hidden[i][:, 0]).log_softmax(-1)
            lm_ref.append(-logp.gather(1, window[:, i + 1:i + 2]))
        for i in range(window.shape[1] - 2):
            h = model.mtp_hidden(hidden[i], window[:, i + 1:i + 2], torch.full((2, 1), i), kv)
            logp = model.lm_head(h[:, 0]).log_softmax(-1)
            mtp_ref.append(-logp.gather(1, window[:, i + 2:i + 3]))
        next_token_logits = model.lm_head(torch.cat(hidden, 1)[:, :-1]).flatten(0, 1)
    assert float(losses.mtp) == pytest.approx(float(torch.cat(mtp_ref).mean()), rel=1e-4)
    assert float(losses.lm) == pytest.approx(float(torch.cat(lm_ref).mean()), rel=1e-4)
    wrong_target = F.cross_entropy(next_token_logits, window[:, 2:].flatten())
    assert abs(float(losses.mtp) - float(wrong_target)) > 1e-3  # i+2, not the main model's i+1 logits


def test_the_mtp_module_never_sees_the_token_it_predicts():
    model = _small_model(4)
    gen = torch.Generator().manual_seed(4)
    window = torch.randint(3, 512, (2, 25), generator=gen)
    changed = window.clone()
    changed[:, 12:] = torch.randint(3, 512, (2, 13), generator=gen)

    def mtp_logits(w):
        ids = w[:, :-1]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        kv = model.new_cache()
        with torch.no_grad():
            h = model.hidden_states(ids, pos, kv)
            return model.lm_head(model.mtp_hidden(h[:, :-1], ids[:, 1:], pos[:, :-1], kv))

    a, b = mtp_logits(window), mtp_logits(changed)
    # entry i reads t_{i+1}: entries i <= 10 predate the change at 12 (t_{i+2} = 12 is the target of 10)
    torch.testing.assert_close(a[:, :11], b[:, :11], atol=1e-5, rtol=1e-5)
    assert (a[:, 11:] - b[:, 11:]).abs().max() > 1e-2


def test_cmx_train_writes_a_checkpoint_that_cmx_generate_serves(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--tokens", "2048", "--seq-len", "64", "--batch-size", "4",
                 "--threads", "1", "--corpus-root", str(corpus)]) == 0
    assert "trained 8 steps" in capsys.readouterr().out
    assert main(["generate", "--local", "--checkpoint", str(out), "--max-tokens", "8", "def alpha_1("]) == 0
    assert capsys.readouterr().out.startswith("def alpha_1(")


def test_a_budget_is_required():
    with pytest.raises(ValueError, match="budget"):
        TrainSettings()
