"""The demo prints a random-weight model's text so that a terminal shows every character."""
from __future__ import annotations

from cloudmatrix.demo import printable


def test_invisible_characters_are_escaped_and_spaces_kept():
    assert printable(" ab\x01c\u200b d\n\t") == '" ab\\u0001c\\u200b d\\u000a\\u0009"'
    assert printable("plain text, é 漢") == '"plain text, é 漢"'
