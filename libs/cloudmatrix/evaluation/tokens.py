"""The test split as the model and the baselines see it: one token stream, its windows, and the
number of UTF-8 bytes each token id stands for (for bits per byte)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.train.corpus import Corpus
from cloudmatrix.train.data import eval_windows, token_stream


@dataclasses.dataclass(frozen=True)
class EvalData:
    """train [N] and test [M] streams; windows [W, L + 1] over the test stream; bytes per id [V]."""

    train: torch.Tensor
    test: torch.Tensor
    windows: torch.Tensor
    token_bytes: torch.Tensor

    @property
    def targets(self) -> torch.Tensor:
        """The predicted tokens in window order: [W * L]."""
        return self.windows[:, 1:].reshape(-1)


def token_byte_lengths(tokenizer: TextTokenizer) -> torch.Tensor:
    """[V] UTF-8 bytes of each id's text; special tokens have none."""
    return torch.tensor([len(tokenizer.token_bytes(i)) for i in range(tokenizer.tok.get_vocab_size())])


def load_eval_data(checkpoint: Path, corpus: Corpus, seq_len: int, max_windows: int | None,
                   with_train: bool = True) -> EvalData:
    """The test split's windows; the train split's stream too when ``with_train`` (for baselines)."""
    tokenizer = TextTokenizer.load(checkpoint)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    train = (token_stream(tokenizer.tok, corpus.texts("train"), bos, eos) if with_train
             else torch.zeros(0, dtype=torch.int32))
    test = token_stream(tokenizer.tok, corpus.texts("test"), bos, eos)
    windows = eval_windows(test, seq_len, max_windows)
    return EvalData(train, test, windows, token_byte_lengths(tokenizer))
