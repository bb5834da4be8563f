"""Completion text as it streams: token ids -> text deltas, cut at the first stop string.

Text that could be the start of a stop string is held back until it is clear whether the stop
string follows; at the end of the generation ``flush`` releases what is still held.
"""
from __future__ import annotations

from cloudmatrix.model.tokenizer import StreamDecoder, TextTokenizer


class OutputText:
    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stop = stop
        self.pending = ""        # decoded, not yet emitted (may begin a stop string)
        self.stopped = False     # a stop string was found; nothing more is emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can be emitted now."""
        if self.stopped:
            return ""
        return self._release(self.decoder.push(token_id))

    def flush(self) -> str:
        """The end of the generation: whatever is still held back (up to a stop string)."""
        if self.stopped:
            return ""
        text = self._release(self.decoder.flush())
        if self.stopped:
            return text
        text, self.pending = text + self.pending, ""
        return text

    def _release(self, new: str) -> str:
        self.pending += new
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            text, self.pending = self.pending[:cut], ""
            return text
        keep = self._held_back()
        text = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return text

    def _first_stop(self) -> int | None:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best
