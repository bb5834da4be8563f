"""The in-process reference engine and sampling."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from cloudmatrix.checkpoints import load_model
from cloudmatrix.model.generate import generate
from cloudmatrix.model.sampling import filter_logits, sample_token
from cloudmatrix.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def _brute_force_greedy(model, prompt, steps):
    """No cache: recompute the whole sequence every step."""
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], model.new_cache())
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_recompute_without_cache(model):
    prompt = torch.randint(3, 1024, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    got = list(generate(model, prompt, SamplingParams(max_tokens=12)))
    assert got == _brute_force_greedy(model, prompt, len(got))


def test_same_seed_same_tokens_other_seed_differs(model):
    prompt = [0, 5, 77, 300]
    params = dict(temperature=1.0, top_p=0.95, max_tokens=24)
    a = list(generate(model, prompt, SamplingParams(seed=7, **params)))
    b = list(generate(model, prompt, SamplingParams(seed=7, **params)))
    c = list(generate(model, prompt, SamplingParams(seed=8, **params)))
    assert a == b and a != c


def test_stops_on_eos(tiny_checkpoint):
    model = load_model(tiny_checkpoint)  # a private copy: its config is edited
    free_run = list(generate(model, [0, 9, 10], SamplingParams(max_tokens=6)))
    model.cfg = dataclasses.replace(model.cfg, eos_token_id=free_run[2])
    expected = free_run[:free_run.index(free_run[2]) + 1]
    assert list(generate(model, [0, 9, 10], SamplingParams(max_tokens=20))) == expected


def test_prompt_longer_than_context_is_rejected(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    with pytest.raises(ValueError, match="context limit"):
        list(generate(model, [1] * model.cfg.max_position_embeddings, SamplingParams()))


def test_top_k_and_top_p_keep_exactly_the_brute_force_sets():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(4))
    kept_k = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=5)))
    assert set(kept_k.nonzero().flatten().tolist()) == set(logits.topk(5).indices.tolist())
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    expected, total = set(), 0.0
    for i in order:  # smallest prefix of the sorted distribution reaching p
        expected.add(i)
        total += probs[i].item()
        if total >= 0.8:
            break
    kept_p = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8)))
    assert set(kept_p.nonzero().flatten().tolist()) == expected


def test_sampling_follows_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0])
    gen = torch.Generator().manual_seed(0)
    draws = [sample_token(logits, SamplingParams(temperature=1.0), gen) for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / 4000
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.03, rtol=0)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_tokens", 0)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_cli_generate_streams_and_is_reproducible(tiny_checkpoint):
    cmd = [sys.executable, "-m", "cloudmatrix.cli.main", "generate", "--local", "--checkpoint", str(tiny_checkpoint),
           "--max-tokens", "16", "--temperature", "0.9", "--seed", "5", "Hello supernode"]
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("Hello supernode")
    assert "16 tokens" in runs[0].stderr or "tokens in" in runs[0].stderr
