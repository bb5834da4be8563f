"""The count baselines of `cmx eval`: every context's distribution sums to one (brute force over the
vocabulary), seen continuations beat unseen ones, and the add-one unigram is what it says."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cloudmatrix.evaluation.ngram import KneserNeyTrigram, Unigram

V = 9


def _p(model, a: int, b: int, c: int) -> float:
    return math.exp(-model.nll(np.array([a, b, c]))[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kneser_ney_distributions_sum_to_one_in_seen_and_unseen_contexts(seed):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, V - 2, 4000)  # ids V-2, V-1 never occur
    kn = KneserNeyTrigram(train, V)
    for a, b in [(0, 1), (3, 3), (V - 1, 2), (2, V - 1), (V - 2, V - 1)]:
        assert sum(_p(kn, a, b, c) for c in range(V)) == pytest.approx(1.0, abs=1e-9)
    assert min(_p(kn, 0, 1, c) for c in range(V)) > 0


def test_a_deterministic_sequence_is_learned():
    train = np.array([0, 1, 2, 3] * 200)
    kn = KneserNeyTrigram(train, V)
    assert _p(kn, 0, 1, 2) > 0.9 and _p(kn, 0, 1, 5) < 0.01
    assert kn.nll(np.array([0, 1, 2, 3, 0, 1])).mean() < Unigram(train, V).nll(np.array([0, 1, 2, 3, 0, 1])).mean()


def test_unigram_is_add_one():
    train = np.array([0, 0, 0, 1])
    nll = Unigram(train, 4).nll(np.array([5, 0, 1, 3]) % 4)
    assert np.allclose(np.exp(-nll), [4 / 8, 2 / 8, 1 / 8])
