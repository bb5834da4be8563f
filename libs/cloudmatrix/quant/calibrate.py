"""Calibration: run prompts through the float model and record what each linear layer sees.

Shape legend: B = prompts per batch, S = prompt length, M = tokens reaching a layer, K = in_features,
C = sample cap.

For every linear layer to quantize a forward pre-hook keeps the per-input-channel max |x| over all
calibration tokens and a bounded uniform sample of input rows (each row gets a random key from a
generator seeded by (seed, layer name); the C smallest keys stay), so the result is deterministic
and memory stays at C rows per layer however many prompts run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.train.corpus import load_corpus

# Token ids below this are BOS / EOS / PAD: random calibration prompts avoid them.
_FIRST_ORDINARY_ID = 3


@dataclasses.dataclass
class LinearStats:
    """What calibration saw at one linear's input: x_amax [K], sample [<= C, K], tokens seen."""

    x_amax: torch.Tensor
    sample: torch.Tensor
    keys: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, in_features: int) -> LinearStats:
        return cls(torch.zeros(in_features), torch.zeros(0, in_features), torch.zeros(0))

    def add(self, x: torch.Tensor, cap: int, gen: torch.Generator) -> None:
        # x: [M, K]
        x = x.detach().float()
        self.tokens += x.shape[0]
        if x.shape[0]:
            self.x_amax = torch.maximum(self.x_amax, x.abs().amax(dim=0))
        keys = torch.cat([self.keys, torch.rand(x.shape[0], generator=gen)])
        rows = torch.cat([self.sample, x])
        keep = keys.argsort()[:cap].sort().values
        self.keys, self.sample = keys[keep], rows[keep]


def _seed_for(name: str, seed: int) -> int:
    digest = hashlib.sha256(f"calibration:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def calibration_prompts(tokenizer: TextTokenizer, vocab_size: int, n_samples: int,
                        seq_len: int, seed: int) -> torch.Tensor:
    """[n_samples, seq_len] token ids: the first half windows of the shipped corpus (encoded with the
    checkpoint's tokenizer, cycled if short), the rest uniform random ids; each starts with BOS."""
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"calibration needs >= 1 sample of >= 2 tokens, got {n_samples} x {seq_len}")
    text = resources.files("cloudmatrix.model").joinpath("data/tokenizer_corpus.txt").read_text("utf-8")
    stream = tokenizer.encode(" ".join(text.split()), add_bos=False)
    n_corpus = (n_samples + 1) // 2
    stream = stream * (1 + (seq_len * n_corpus) // max(len(stream), 1))
    starts = [(i * len(stream)) // (n_corpus + 1) for i in range(n_corpus)]
    corpus = [[tokenizer.bos_id, *stream[s:s + seq_len - 1]] for s in starts]
    gen = torch.Generator().manual_seed(seed)
    random_ids = torch.randint(_FIRST_ORDINARY_ID, vocab_size, (n_samples - n_corpus, seq_len), generator=gen)
    random_ids[:, 0] = tokenizer.bos_id
    return torch.cat([torch.tensor(corpus, dtype=torch.long), random_ids])


# A trained checkpoint calibrates on this many files of its corpus's train split (first by path).
TRAINED_CALIBRATION_FILES = 8


def _readable_dir(path: str) -> bool:
    """False for a directory this user may not look into (the training machine's corpus path, as a
    non-root container user sees it) as for one that is not there."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def calibration_texts(checkpoint_dir: str | Path) -> list[str] | None:
    """Text like the model's training data, when the checkpoint was trained by `cmx train` (it has
    a train.json): the first files of this machine's standard library train split. Else None."""
    if not (Path(checkpoint_dir) / "train.json").is_file():
        return None
    root = json.loads((Path(checkpoint_dir) / "train.json").read_text()).get("corpus", {}).get("root")
    corpus = load_corpus(root if root and _readable_dir(root) else None)
    names = corpus.files["train"][:TRAINED_CALIBRATION_FILES]
    return [(corpus.root / name).read_bytes().decode("utf-8", errors="replace") for name in names]


def checkpoint_calibration_prompts(checkpoint_dir: str | Path, vocab_size: int, n_samples: int, seq_len: int,
                                   seed: int) -> torch.Tensor:
    """The calibration prompts for a checkpoint: windows of its training text for a trained model,
    else half shipped corpus, half random ids (a random-init model has no data distribution)."""
    tokenizer = TextTokenizer.load(checkpoint_dir)
    texts = calibration_texts(checkpoint_dir)
    if texts is None:
        return calibration_prompts(tokenizer, vocab_size, n_samples, seq_len, seed)
    return text_calibration_prompts(tokenizer, texts, n_samples, seq_len)


def text_calibration_prompts(tokenizer: TextTokenizer, texts: list[str], n_samples: int, seq_len: int) -> torch.Tensor:
    """[n_samples, seq_len]: evenly spaced windows of the texts' token stream, each starting with BOS."""
    stream = [t for text in texts for t in tokenizer.encode(text, add_bos=False)]
    if len(stream) < n_samples * seq_len:
        raise ValueError(f"calibration text has {len(stream)} tokens; {n_samples} x {seq_len} are needed")
    starts = [(i * (len(stream) - seq_len)) // max(n_samples - 1, 1) for i in range(n_samples)]
    return torch.tensor([[tokenizer.bos_id, *stream[s:s + seq_len - 1]] for s in starts], dtype=torch.long)


def collect_stats(model: DeepseekV3, names: list[str], prompts: torch.Tensor, sample_cap: int,
                  seed: int, batch_size: int = 8) -> dict[str, LinearStats]:
    """Run prompts [N, S] through the float model; returns the input statistics of each named linear."""
    stats = {n: LinearStats.empty(model.get_submodule(n).in_features) for n in names}
    gens = {n: torch.Generator().manual_seed(_seed_for(n, seed)) for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(_recorder(stats[n], sample_cap, gens[n]))
               for n in names]
    try:
        for batch in prompts.split(batch_size):
            _calibration_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.inference_mode()
def _calibration_forward(model: DeepseekV3, batch: torch.Tensor) -> None:
    """The model over batch [B, S]; its MTP module too, when it has one (t_{i+1} after h_i)."""
    positions = torch.arange(batch.shape[1]).expand_as(batch)  # [B, S]
    kv = model.new_cache()
    hidden = model.hidden_states(batch, positions, kv)  # [B, S, D]
    if len(model.mtp):
        model.mtp_hidden(hidden[:, :-1], batch[:, 1:], positions[:, :-1], kv)


def _recorder(stats: LinearStats, cap: int, gen: torch.Generator):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        stats.add(x.reshape(-1, x.shape[-1]), cap, gen)
    return hook
