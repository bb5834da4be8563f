"""The chat template of docs/model.md (tokenizer_config.json's ``chat_template``), in Python:

    <BOS>{system}\\n\\n<｜User｜>{user}<｜Assistant｜>{assistant}<EOS><｜User｜>...<｜Assistant｜>

The rendered text is tokenized in one piece, without adding another BOS, as Hugging Face's
``apply_chat_template(..., tokenize=True)`` does, so the ids are the same.
"""
from __future__ import annotations

from typing import Any

from cloudmatrix.errors import FieldError
from cloudmatrix.model.tokenizer import BOS, EOS

USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system


def render(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` ({role, content} dicts); ValueError names the bad message."""
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "must be a non-empty list of {role, content} objects")
    parts = [BOS]
    for i, message in enumerate(messages):
        role, content = _role(message, i), _content(message, i)
        if role in ("system", "developer"):
            parts.append(f"{content}\n\n")
        elif role == "user":
            parts.append(f"{USER}{content}")
        else:
            parts.append(f"{ASSISTANT}{content}{EOS}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def _role(message: Any, i: int) -> str:
    if not isinstance(message, dict):
        raise FieldError(f"messages[{i}]", "must be an object with role and content")  # noqa: TRY004 - bad input: 400
    role = message.get("role")
    if role not in ROLES:
        raise FieldError(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def _content(message: dict[str, Any], i: int) -> str:
    """A string, or a list of text parts ({"type": "text", "text": ...}) joined together."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise FieldError(f"messages[{i}].content", "must be a string or a list of text parts")
