"""The sequences a die holds between steps (vLLM's cached request state): a sequence's block
table and sampling parameters arrive in full once, then each step sends only its new tokens and
new block ids (``cached``). The instance says when a sequence ends (``finished_seq_ids``); a
restart or a new LoadModel forgets them all. At most one entry per KV block is kept (a live
sequence holds at least one block), the least recently stepped going first beyond that.
"""
from __future__ import annotations

import collections
import dataclasses
import threading

from cloudmatrix.errors import FieldError
from cloudmatrix.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class SequenceStep:
    """One sequence's work in a Forward: new tokens at [start, start + len(token_ids)).
    ``cached``: the die holds the sequence; ``block_table`` lists only its new blocks."""

    seq_id: str
    token_ids: list[int]
    start: int
    block_table: list[int]
    sampling: SamplingParams
    skip_sampling: bool = False
    cached: bool = False
    following_token: int | None = None   # the token after token_ids (prompt log-probabilities, MTP)
    draft: int | None = None             # the MTP module's draft of the next token, to verify


@dataclasses.dataclass
class _Held:
    block_table: list[int]
    sampling: SamplingParams


class SequenceRegistry:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: collections.OrderedDict[str, _Held] = collections.OrderedDict()
        self._lock = threading.Lock()  # the two microbatches' Forwards run in two threads

    def __len__(self) -> int:
        return len(self._held)

    def finish(self, seq_ids: list[str]) -> None:
        with self._lock:
            for seq_id in seq_ids:
                self._held.pop(seq_id, None)

    def resolve(self, step: SequenceStep) -> SequenceStep:
        """The step with the sequence's whole block table and its sampling parameters; remembers
        them for the next step."""
        with self._lock:
            if not step.cached:
                self._held[step.seq_id] = _Held(list(step.block_table), step.sampling)
                self._held.move_to_end(step.seq_id)
                while len(self._held) > self.capacity:
                    self._held.popitem(last=False)
                return step
            held = self._held.get(step.seq_id)
            if held is None:
                raise FieldError("sequences.cached", f"sequence {step.seq_id!r}: this die does not hold it "
                                 "(never sent in full, finished, or the die restarted)")
            held.block_table.extend(step.block_table)
            self._held.move_to_end(step.seq_id)
            return dataclasses.replace(step, block_table=held.block_table, sampling=held.sampling, cached=False)
