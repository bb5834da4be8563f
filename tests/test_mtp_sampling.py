"""Speculative sampling with the MTP draft is exact: the verified tokens follow the target model's
distribution (chi-square against probabilities computed directly), and a seeded request samples
the same tokens twice."""
from __future__ import annotations

import pytest
import torch

from cloudmatrix.checkpoints import load_model
from cloudmatrix.kv.block_pool import PagedLatentPool, PoolShape
from cloudmatrix.model.paged_step import StepRow, paged_step
from cloudmatrix.model.sampling import filter_logits
from cloudmatrix.model.speculative import verify_draft
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.sampling_params import SamplingParams
from tests.test_shipped_model import MODEL

MIN_EXPECTED = 5.0  # cells expected to hold fewer samples are pooled into one


def chi_square_p(observed: dict, expected: dict[object, float]) -> float:
    """p-value of Pearson's chi-square test of observed counts against expected counts (which sum
    to the sample size); cells expected below MIN_EXPECTED are pooled."""
    big = {k for k, e in expected.items() if e >= MIN_EXPECTED}
    cells = [(observed.get(k, 0), expected[k]) for k in big]
    rest_e = sum(e for k, e in expected.items() if k not in big)
    rest_o = sum(n for k, n in observed.items() if k not in big)
    if rest_e > 0:
        cells.append((rest_o, rest_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_verify_draft_gives_the_target_distribution_for_any_draft():
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(3)) * 2  # [2, V]
    params = [SamplingParams(temperature=0.8, top_k=8, seed=s) for s in range(4000)]
    target = filter_logits(logits[0], params[0]).softmax(-1)  # [V]
    draft = int(target.argsort()[-3])  # a plausible draft that is often wrong
    firsts, seconds = {}, {}
    for p in params:
        tokens = verify_draft(logits, draft, p, position=10)
        firsts[tokens[0]] = firsts.get(tokens[0], 0) + 1
        if len(tokens) == 2:
            assert tokens[0] == draft
            seconds[tokens[1]] = seconds.get(tokens[1], 0) + 1
    assert chi_square_p(firsts, {t: 4000 * float(target[t]) for t in range(12)}) > 1e-3
    after = filter_logits(logits[1], params[0]).softmax(-1)
    n = sum(seconds.values())
    assert chi_square_p(seconds, {t: n * float(after[t]) for t in range(12)}) > 1e-3
    assert 0 < firsts[draft] < 4000 and n == firsts[draft]  # accepted exactly when the draft came out


def test_greedy_verification_accepts_exactly_the_argmax():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(4))
    best, after = int(logits[0].argmax()), int(logits[1].argmax())
    assert verify_draft(logits, best, SamplingParams(), 5) == [best, after]
    assert verify_draft(logits, (best + 1) % 50, SamplingParams(), 5) == [best]


@pytest.fixture(scope="module")
def mtp_model():
    torch.manual_seed(0)
    return load_model(MODEL, mtp=True).eval()


def _pool(model, rows: int, blocks_per_row: int) -> PagedLatentPool:
    cfg = model.cfg
    return PagedLatentPool(PoolShape(cfg.num_hidden_layers + 1, rows * blocks_per_row, 16, cfg.kv_lora_rank,
                                     cfg.qk_rope_head_dim))


def _next_two(model, context: list[int], draft: int, seeds: range) -> list[tuple[int, int]]:
    """The two tokens after ``context`` for each seed, with ``draft`` verified after its last
    token (one step; a second one samples the token after a rejected draft), through the same
    paged step the dies run."""
    n, blocks = len(seeds), -(-(len(context) + 2) // 16)
    pool, out = _pool(model, n, blocks), {}
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(n)]
    params = [SamplingParams(temperature=1.0, seed=s) for s in seeds]
    with torch.inference_mode():
        first = paged_step(model, pool, [StepRow(context, 0, t, p, draft=draft) for t, p in zip(tables, params)])
        again = [i for i, r in enumerate(first) if len(r.tokens) == 1]
        second = paged_step(model, pool, [StepRow(first[i].tokens, len(context), tables[i], params[i]) for i in again])
    for i, r in enumerate(first):
        out[i] = tuple(r.tokens)
    for i, r in zip(again, second):
        out[i] = out[i] + tuple(r.tokens)
    return [out[i] for i in range(n)]


def test_the_next_two_tokens_follow_the_target_model_and_repeat_with_the_seed(mtp_model):
    model, context = mtp_model, TextTokenizer.load(MODEL).encode("if x is None:\n    raise")
    with torch.inference_mode():
        logits = model(torch.tensor([context]), torch.arange(len(context))[None], model.new_cache())[0, -1]
        p1 = logits.softmax(-1)  # [V]
        draft = int(p1.argmax())  # verified against p1: accepted about p1(draft) of the time
        likely = p1.topk(24).indices.tolist()
        batch = torch.tensor([context + [t] for t in likely])  # [24, n + 1]
        p2 = model(batch, torch.arange(len(context) + 1).expand(len(likely), -1), model.new_cache())[:, -1].softmax(-1)
    samples = _next_two(model, context, draft, range(2000))
    observed: dict = {}
    for pair in samples:
        observed[pair] = observed.get(pair, 0) + 1
    expected = {(a, b): 2000 * float(p1[a] * p2[i, b]) for i, a in enumerate(likely) for b in range(p2.shape[1])}
    expected["rest"] = 2000 - sum(expected.values())
    observed_rest = sum(n for pair, n in observed.items() if pair not in expected)
    observed = {k: n for k, n in observed.items() if k in expected} | {"rest": observed_rest}
    assert 0.1 < float(p1[draft]) < 0.9, "the context should make the draft neither sure nor hopeless"
    assert chi_square_p(observed, expected) > 1e-3
    assert _next_two(model, context, draft, range(40)) == samples[:40]  # the same seeds, the same tokens
