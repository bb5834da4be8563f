"""Byte-level BPE tokenizer: built deterministically from a shipped corpus, stored as tokenizer.json."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜pad｜>"
# Special tokens take the first ids, so bos_token_id = 0 and eos_token_id = 1 as in DeepSeek-V3.
SPECIAL_TOKENS = (BOS, EOS, PAD)

# Documented in docs/model.md: a plain role-tagged transcript ending with the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] in ['system', 'developer'] %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on the shipped corpus; same inputs give the same merges."""
    corpus = resources.files("cloudmatrix.model").joinpath("data/tokenizer_corpus.txt").read_text("utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer)
    # The shipped corpus may yield fewer merges than asked: reserve the rest, as DeepSeek does.
    reserved = [f"<｜reserved_{i}｜>" for i in range(vocab_size - tok.get_vocab_size())]
    tok.add_special_tokens(reserved)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, max_length: int) -> None:
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class TextTokenizer:
    """encode/decode text with the checkpoint's tokenizer.json; BOS is prepended on encode."""

    def __init__(self, tok: Tokenizer, bos_id: int, eos_id: int) -> None:
        self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> "TextTokenizer":
        path = Path(checkpoint_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in checkpoint directory {checkpoint_dir}")
        tok = Tokenizer.from_file(str(path))
        return cls(tok, tok.token_to_id(BOS), tok.token_to_id(EOS))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete UTF-8 tail decodes as U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        delta, self.emitted = text[len(self.emitted):], text
        return delta
