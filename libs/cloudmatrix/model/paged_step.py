"""One step of a batch of sequences over a paged KV pool: the main model over every sequence's new
tokens (and its draft), the sampled or verified tokens, and, when the model has its MTP module,
the module over every position whose next token is now known (its KV) and the next draft.

What a die runs in a Forward and what the in-process engine runs in a step, the same code.

At position i the MTP entry holds (h_i, t_{i+1}) (model/mtp.py), so a row's MTP positions are
its new positions whose next token is known after the step: with a sampled token, all of them
(an accepted draft included, the rejected one not); with ``following`` (a prompt chunk before the
last), all of them too. Every step runs the MTP layer, with no rows if need be: its MoE is an
expert-parallel layer like the others, whose fabric rounds every die takes part in.

Shape legend: N = packed new tokens of the step, M = packed MTP positions, D = hidden, V = vocab.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from cloudmatrix.kv.block_pool import PagedLatentPool
from cloudmatrix.kv.paged_view import PagedBatch, PagedKVView
from cloudmatrix.model.sampling import sample_token
from cloudmatrix.model.speculative import verify_draft
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class StepRow:
    """One sequence's work: new tokens at [start, start + len(token_ids)), then its ``draft`` (the
    MTP module's guess of the next token, verified here) if any."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    sampling: SamplingParams
    sample: bool = True                 # sample the token after the last one (else only write KV)
    draft: int | None = None
    following: int | None = None        # the token after token_ids, when not sampling
    all_logits: bool = False            # logits at every fed position (prompt log-probabilities)

    @property
    def fed(self) -> list[int]:
        """What the main model reads: the new tokens and the draft."""
        return self.token_ids + ([self.draft] if self.draft is not None else [])

    @property
    def logit_rows(self) -> int:
        """Fed positions whose logits the step computes: all, or the last token's (and the draft's)."""
        return len(self.fed) if self.all_logits else 1 + (self.draft is not None)


@dataclasses.dataclass(frozen=True)
class RowResult:
    tokens: list[int]               # sampled: one, or two when the draft was accepted; [] if not sampling
    logits: torch.Tensor            # [row.logit_rows, V] fp32 at the last fed positions
    draft: int | None = None        # the MTP module's guess of the token after ``tokens``
    mtp_positions: int = 0          # positions the MTP module ran at (wrote its KV)


def paged_step(model: DeepseekV3, pool: PagedLatentPool, rows: list[StepRow]) -> list[RowResult]:
    """Run the rows (at least one) as one packed batch; writes their KV into ``pool``."""
    batch = PagedBatch([r.block_table for r in rows], [r.start for r in rows], [len(r.fed) for r in rows])
    ids = torch.tensor([t for r in rows for t in r.fed])[None]  # [1, N]
    hidden = model.hidden_states(ids, batch.positions(), PagedKVView(pool, batch))[0]  # [N, D]
    ends = list(itertools.accumulate(len(r.fed) for r in rows))
    spans = [slice(end - len(r.fed), end) for r, end in zip(rows, ends)]
    wanted = torch.cat([torch.arange(end - r.logit_rows, end) for r, end in zip(rows, ends)])
    logits = model.lm_head(hidden[wanted]).float()  # [sum of logit_rows, V]: the head only where needed
    cuts = list(itertools.accumulate(r.logit_rows for r in rows))
    per_row = [logits[cut - r.logit_rows:cut] for r, cut in zip(rows, cuts)]
    tokens = [_sample(r, row_logits) for r, row_logits in zip(rows, per_row)]
    if not len(model.mtp):
        return [RowResult(t, row_logits) for t, row_logits in zip(tokens, per_row)]
    nexts = [mtp_positions(r, t) for r, t in zip(rows, tokens)]
    drafts = _drafts(model, pool, rows, [hidden[span] for span in spans], nexts)
    return [RowResult(t, row_logits, d, len(n)) for t, row_logits, d, n in zip(tokens, per_row, drafts, nexts)]


def _sample(row: StepRow, logits: torch.Tensor) -> list[int]:
    """logits: [row.logit_rows, V] -> the row's new tokens."""
    if not row.sample:
        return []
    position = row.start + len(row.token_ids)  # of the token sampled after the last new one
    if row.draft is not None:
        return verify_draft(logits[-2:], row.draft, row.sampling, position)
    return [sample_token(logits[-1], row.sampling, row.sampling.generator(position))]


def mtp_positions(row: StepRow, tokens: list[int]) -> list[int]:
    """The next token of each of the row's MTP positions (their count is the list's length)."""
    known = row.token_ids + (tokens if row.sample else [row.following] if row.following is not None else [])
    accepted = len(row.token_ids) + (len(tokens) == 2)  # fed positions with a known next token
    return known[1:accepted + 1]


def _drafts(model: DeepseekV3, pool: PagedLatentPool, rows: list[StepRow], hidden: list[torch.Tensor],
            nexts: list[list[int]]) -> list[int | None]:
    """The MTP module over each row's MTP positions (``nexts``: their next tokens), writing its
    KV; the argmax of its last position is the next draft of a row that sampled."""
    live = [i for i, n in enumerate(nexts) if n]
    layer = model.mtp[0]
    if not live:  # no row has one: the layer's MoE still takes part in its fabric rounds
        layer.mlp(torch.zeros(0, 1, model.cfg.hidden_size))
        return [None] * len(rows)
    batch = PagedBatch([rows[i].block_table for i in live], [rows[i].start for i in live],
                       [len(nexts[i]) for i in live])
    h = torch.cat([hidden[i][:len(nexts[i])] for i in live])[None]  # [1, M, D]
    next_ids = torch.tensor([t for i in live for t in nexts[i]])[None]  # [1, M]
    out = model.mtp_hidden(h, next_ids, batch.positions(), PagedKVView(pool, batch))[0]  # [M, D]
    ends = itertools.accumulate(len(nexts[i]) for i in live)
    sampled = [(i, end - 1) for i, end in zip(live, ends) if rows[i].sample]  # only they get a draft
    drafts: list[int | None] = [None] * len(rows)
    if sampled:
        guesses = model.lm_head(out[torch.tensor([last for _, last in sampled])]).argmax(-1).tolist()
        for (i, _), guess in zip(sampled, guesses):
            drafts[i] = guess
    return drafts
