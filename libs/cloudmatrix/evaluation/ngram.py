"""Count-based baselines fitted on the training split: add-one unigram and an interpolated
Kneser-Ney trigram (absolute discount D = 0.75 at every order, continuation counts below the top).

Token streams are int64 numpy arrays; an n-gram is one int64 key (a * V + b) * V + c.
``nll(stream)`` returns the negative log-likelihood in nats of stream[i] given stream[:i] for
i = 1 .. N-1 (the first token is never predicted, as in the model's windows).
"""
from __future__ import annotations

import numpy as np

DISCOUNT = 0.75


def _count(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.unique(keys, return_counts=True)


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[k] for each query key present in sorted_keys, else 0."""
    idx = np.searchsorted(sorted_keys, queries).clip(max=max(len(sorted_keys) - 1, 0))
    hit = sorted_keys[idx] == queries if len(sorted_keys) else np.zeros(len(queries), bool)
    return np.where(hit, values[idx], 0)


class Unigram:
    """P(c) = (count(c) + 1) / (N + V)."""

    def __init__(self, train: np.ndarray, vocab_size: int) -> None:
        counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
        self.log_p = np.log((counts + 1) / (counts.sum() + vocab_size))

    def nll(self, stream: np.ndarray) -> np.ndarray:
        return -self.log_p[stream[1:]]


class KneserNeyTrigram:
    """Interpolated Kneser-Ney: P3(c|ab) = max(C(abc) - D, 0) / C(ab.) + D N1+(ab.) / C(ab.) P2(c|b),
    P2 on continuation counts N1+(.bc), P1(c) = N1+(.c) / N1+(..) interpolated with uniform 1/V."""

    def __init__(self, train: np.ndarray, vocab_size: int) -> None:
        v = self.v = np.int64(vocab_size)
        t = train.astype(np.int64)
        self.tri, self.tri_n = _count((t[:-2] * v + t[1:-1]) * v + t[2:])
        # Trigram contexts (a, b): C(ab.) and N1+(ab.)
        self.ctx, self.ctx_n = _count(np.repeat(self.tri // v, self.tri_n))
        self.ctx_types = _count(self.tri // v)[1]
        # Middle order on continuation counts: N1+(.bc), and per b: sum over c and distinct c.
        self.bc, self.bc_cont = _count(self.tri % (v * v))
        self.b, self.b_cont = _count(np.repeat(self.bc // v, self.bc_cont))
        self.b_types = _count(self.bc // v)[1]
        # Lowest order: N1+(.c) over distinct bigrams.
        bigrams = np.unique(t[:-1] * v + t[1:])
        cont = np.bincount(bigrams % v, minlength=vocab_size).astype(np.float64)
        seen = float((cont > 0).sum())
        total = cont.sum()
        self.p1 = np.maximum(cont - DISCOUNT, 0) / total + DISCOUNT * seen / total / vocab_size

    def nll(self, stream: np.ndarray) -> np.ndarray:
        s, v = stream.astype(np.int64), self.v
        c = s[1:]
        b = s[:-1]
        a = np.concatenate([[-1], s[:-2]])  # position 1 has no a: backs off to the bigram level
        p = self._p2(b, c)
        has_a = a >= 0
        ab = np.where(has_a, a * v + b, -1)
        c_ab = _lookup(self.ctx, self.ctx_n, ab).astype(np.float64)
        n_ab = _lookup(self.ctx, self.ctx_types, ab).astype(np.float64)
        c_abc = _lookup(self.tri, self.tri_n, np.where(has_a, ab * v + c, -1)).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            p3 = np.maximum(c_abc - DISCOUNT, 0) / c_ab + DISCOUNT * n_ab / c_ab * p
        return -np.log(np.where(c_ab > 0, p3, p))

    def _p2(self, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        p1 = self.p1[c]
        n_b = _lookup(self.b, self.b_cont, b).astype(np.float64)
        types_b = _lookup(self.b, self.b_types, b).astype(np.float64)
        n_bc = _lookup(self.bc, self.bc_cont, b * self.v + c).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            p2 = np.maximum(n_bc - DISCOUNT, 0) / n_b + DISCOUNT * types_b / n_b * p1
        return np.where(n_b > 0, p2, p1)
