"""The choices of one OpenAI response, gathered as the core's events arrive: each choice's text,
tokens and log-probabilities (the echoed prompt's first), and OpenAI's ``logprobs`` objects:
completions' ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``, chat's
``content`` entries with ``bytes`` and ``top_logprobs``."""
from __future__ import annotations

import dataclasses
from typing import Any

from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.sampling_params import TokenLogprobs
from services.gateway.schema import Delta, Finish, Prepared

Entry = tuple[int, TokenLogprobs | None]  # a token and its log-probabilities (None: the prompt's first)


@dataclasses.dataclass
class Choice:
    index: int
    prompt_index: int               # which prompt of the request (choices of one prompt: n of them)
    prepared: Prepared
    echo: str | None                # the prompt's text, when echoed
    text: str = ""
    entries: list[Entry] = dataclasses.field(default_factory=list)
    finish: Finish | None = None

    def add(self, event: Delta | Finish) -> tuple[str, list[Entry]]:
        """Take the next event; returns the text and the log-probability entries it adds."""
        if isinstance(event, Finish):
            self.finish = event
            text, entries = event.text, []
        else:
            text, entries = event.text, list(zip(event.token_ids, event.logprobs))
            if self.echo is not None and not self.text and not self.entries:  # the first event
                text = self.echo + text
                if self.prepared.sampling.prompt_logprobs is not None:
                    prompt = self.prepared.token_ids
                    entries = [(prompt[0], None), *zip(prompt[1:], event.prompt_logprobs), *entries]
        self.text += text
        self.entries += entries
        return text, entries


class LogprobsJson:
    """OpenAI's logprobs objects for entries, with the tokenizer's names of tokens."""

    def __init__(self, tokenizer: TextTokenizer, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat

    def of(self, entries: list[Entry], offset: int = 0) -> dict[str, Any]:
        """``offset``: where the entries' text starts in the choice's text (completions)."""
        return self._chat(entries) if self.chat else self._completion(entries, offset)

    def _completion(self, entries: list[Entry], offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for token, _ in entries:
            offsets.append(offset)
            tokens.append(self.tokenizer.token_text(token)[0])
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp.logprob if lp else None for _, lp in entries],
                "top_logprobs": [self._top_dict(lp) if lp else None for _, lp in entries], "text_offset": offsets}

    def _top_dict(self, lp: TokenLogprobs) -> dict[str, float]:
        """The alternatives and the token itself (vLLM's and OpenAI's completions: up to top + 1)."""
        top = {self.tokenizer.token_text(i)[0]: v for i, v in lp.top}
        return top | {self.tokenizer.token_text(lp.token_id)[0]: lp.logprob}

    def _chat(self, entries: list[Entry]) -> dict[str, Any]:
        return {"content": [self._chat_entry(token, lp.logprob) | {"top_logprobs": [
            self._chat_entry(i, v) for i, v in lp.top]} for token, lp in entries if lp is not None]}

    def _chat_entry(self, token: int, logprob: float) -> dict[str, Any]:
        text, raw = self.tokenizer.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}
