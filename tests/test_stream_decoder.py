"""Streaming text never splits a UTF-8 character: deltas joined equal the full decode, no delta
carries U+FFFD for a character still being completed, and an incomplete tail is dropped."""
from __future__ import annotations

import random

import pytest

from cloudmatrix.model.tokenizer import BYTE_OF_CHAR, StreamDecoder, TextTokenizer, train_bpe

TEXTS = ["def f(x):\n    return x  # ünïcödé ✓", "日本語のテキスト and 😀 emoji", "plain ascii\ttabs\n"]


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe(TEXTS * 3 + ["abc def ghi"], 300)
    from cloudmatrix.model.tokenizer import BOS, EOS
    return TextTokenizer(tok, tok.token_to_id(BOS), tok.token_to_id(EOS))


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_text_and_never_hold_a_partial_character(tokenizer, text):
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) + decoder.flush() == text == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_random_byte_tokens_only_emit_complete_characters(tokenizer):
    """Single-byte tokens of multi-byte characters, pushed one at a time: each delta is whole."""
    rng = random.Random(0)
    text = "".join(rng.choice("aé漢😀 ") for _ in range(200))
    ids = [i for ch in text for i in tokenizer.encode(ch, add_bos=False)]
    decoder = StreamDecoder(tokenizer)
    out = "".join(decoder.push(i) for i in ids)
    assert out + decoder.flush() == text and "\ufffd" not in out


def _byte_ids(tokenizer, data: bytes) -> list[int]:
    """One token per byte (the byte-level alphabet's single-character tokens)."""
    to_char = {b: c for c, b in BYTE_OF_CHAR.items()}
    return [tokenizer.tok.token_to_id(to_char[b]) for b in data]


def test_an_incomplete_tail_is_dropped_not_shown_as_a_replacement(tokenizer):
    ids = tokenizer.encode("ok ", add_bos=False) + _byte_ids(tokenizer, "😀".encode()[:3])  # 3 of 4 bytes
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) == "ok " and deltas[-3:] == ["", "", ""]
    assert decoder.flush() == "" and tokenizer.decode(ids) == "ok "
    assert "\ufffd" in tokenizer.tok.decode(ids)  # what the tokenizers library alone would show


def test_the_last_byte_completes_the_character(tokenizer):
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(i) for i in _byte_ids(tokenizer, "漢😀".encode())]
    assert deltas == ["", "", "漢", "", "", "", "😀"]


def test_invalid_bytes_are_replaced_alike_in_streamed_and_whole_decoding(tokenizer):
    ids = _byte_ids(tokenizer, b"a\x80b\xe6\xbcc\xff") + tokenizer.encode("ok", add_bos=False)
    decoder = StreamDecoder(tokenizer)
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert streamed == tokenizer.decode(ids) == "a\ufffdb\ufffdc\ufffdok"


def test_special_tokens_produce_no_text(tokenizer):
    decoder = StreamDecoder(tokenizer)
    assert decoder.push(tokenizer.bos_id) == "" and decoder.push(tokenizer.eos_id) == ""
