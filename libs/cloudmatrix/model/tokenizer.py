"""Byte-level BPE tokenizers (trained on a corpus, stored as tokenizer.json) and the text of token ids."""
from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
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
    return train_bpe(corpus.splitlines(), vocab_size)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` ids (specials first) trained on ``texts``; deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # A small corpus may yield fewer merges than asked: reserve the rest, as DeepSeek does.
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


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (what ``pre_tokenizers.ByteLevel`` writes): char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_OF_CHAR = _byte_level_alphabet()


class TextTokenizer:
    """encode/decode text with the checkpoint's tokenizer.json; BOS is prepended on encode.

    Text of token ids is defined once, for whole and streamed decoding alike: a byte-level
    tokenizer's tokens are bytes, decoded as UTF-8 with invalid bytes as U+FFFD and an incomplete
    character at the end left out (it has no text yet). Special tokens have no text.
    """

    def __init__(self, tok: Tokenizer, bos_id: int, eos_id: int) -> None:
        self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id
        self.special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.byte_level = type(tok.decoder).__name__ == "ByteLevel"

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

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (byte-level tokenizers only); b"" for a special token."""
        if token_id in self.special:
            return b""
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the tokenizer's vocabulary")
        return bytes(BYTE_OF_CHAR[c] for c in piece)

    def token_text(self, token_id: int) -> tuple[str, bytes]:
        """How an API names one token (OpenAI's logprobs ``token`` and ``bytes``): its bytes and
        their text; a special token by its name; bytes that are not whole UTF-8 characters as
        ``bytes:\\xNN...`` (OpenAI's convention)."""
        if token_id in self.special or not self.byte_level:
            text = self.tok.id_to_token(token_id) if token_id in self.special else self.tok.decode([token_id])
            return text, text.encode()
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    def decode(self, ids: list[int]) -> str:
        if not self.byte_level:
            return self.tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(b"".join(map(self.token_bytes, ids)))


class StreamDecoder:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    The token bytes go through an incremental UTF-8 decoder, which holds back an incomplete
    character until its last byte arrives (as vLLM's detokenizer does); the deltas joined equal
    ``TextTokenizer.decode`` of all the ids. ``flush`` ends the generation: an incomplete character
    left then is dropped, never emitted as U+FFFD.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        if self.tokenizer.byte_level:
            return self.utf8.decode(self.tokenizer.token_bytes(token_id))
        # Other tokenizers: decode everything so far and hold back a trailing U+FFFD.
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def flush(self) -> str:
        self.utf8.reset()
        return ""
