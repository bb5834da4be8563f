"""What a die runs once a model is loaded: its model shard, its paged KV pool ("HBM") and its
link to the fabric. Pure Python over torch; the servicer translates protos.

Shape legend: B = sequences in the batch, N = their new tokens packed in one row, V = vocab.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time

import torch

from cloudmatrix.errors import FieldError
from cloudmatrix.kv.block_pool import PagedLatentPool, PoolShape
from cloudmatrix.model.paged_step import RowResult, StepRow, paged_step
from cloudmatrix.model.sampling import token_logprobs
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.moe.expert_parallel import ExpertParallelMoE
from cloudmatrix.rpc.errors import ResourceExhausted
from cloudmatrix.sampling_params import TokenLogprobs
from services.npu_emulator.modeled import forward_modeled_s
from services.npu_emulator.sequences import SequenceRegistry, SequenceStep

# A die whose fabric stream broke re-attaches at its next Forward; it gives up (the Forward fails
# with UNAVAILABLE) when the group has not re-formed within this long.
RECONNECT_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class SequenceResult:
    seq_id: str
    tokens: list[int]                           # sampled: 1, or 2 with an accepted draft; [] if none
    logits: torch.Tensor | None                 # [V] at the last new position, when asked for
    sampled_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # of tokens
    prompt_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    draft: int | None = None                    # the MTP module's draft of the next token
    mtp_positions: int = 0                      # positions the MTP module ran at


@dataclasses.dataclass
class PhaseClock:
    """Measured wall seconds per phase of one Forward."""

    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


class DieEngine:
    def __init__(self, model: DeepseekV3, pool: PagedLatentPool, link, weight_bytes: int, precision: str) -> None:
        self.model, self.pool, self.link, self.weight_bytes = model, pool, link, weight_bytes
        self.precision = precision
        self.moe_layers = {layer.layer: layer.mlp for layer in (*model.model.layers, *model.mtp)
                           if isinstance(layer.mlp, ExpertParallelMoE)}
        # One Forward per microbatch at a time: the two microbatches of a pipelined step run
        # concurrently (their fabric rounds are keyed apart), each in its own thread.
        self._locks = collections.defaultdict(threading.Lock)
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.sequences = SequenceRegistry(pool.shape.num_blocks)

    def allocate(self, count: int) -> list[int]:
        blocks = self.pool.allocator.allocate(count)
        if blocks is None:
            raise ResourceExhausted(f"KV pool: {count} blocks asked, {self.pool.allocator.num_free} free")
        return blocks

    def write_blocks(self, blocks: list[tuple[int, torch.Tensor]]) -> int:
        """Fill allocated blocks: (block id, kv [L, n, C+R]) with n <= block size. Returns bytes."""
        shape = self.pool.shape
        for block, kv in blocks:
            if not self.pool.allocator.is_allocated(block):
                raise FieldError("blocks", f"block {block} is not allocated")
            if kv.dim() != 3 or kv.shape[0] != shape.num_layers or kv.shape[2] != shape.latent_dim + shape.rope_dim \
                    or not 0 < kv.shape[1] <= shape.block_size:
                raise FieldError("blocks", f"block {block}: kv must be [{shape.num_layers}, 1..{shape.block_size}, "
                                 f"{shape.latent_dim + shape.rope_dim}], got {list(kv.shape)}")
        for block, kv in blocks:
            slots = torch.arange(kv.shape[1]) + block * shape.block_size
            for layer in range(shape.num_layers):
                self.pool.write(layer, slots, kv[layer, :, :shape.latent_dim], kv[layer, :, shape.latent_dim:])
        return sum(kv.numel() * 4 for _, kv in blocks)

    def read_blocks(self, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
        """(block id, valid tokens) -> kv [L, n, C+R] fp32 each."""
        shape = self.pool.shape
        out = []
        for block, n in blocks:
            if not self.pool.allocator.is_allocated(block) or not 0 < n <= shape.block_size:
                raise FieldError("blocks", f"block {block} with {n} tokens: not an allocated block or n not in 1..{shape.block_size}")
            slots = torch.arange(n) + block * shape.block_size
            out.append(torch.cat([self.pool.latent[:, slots], self.pool.k_rope[:, slots]], dim=-1))
        return out

    def forward(self, step: int, microbatch: int, seqs: list[SequenceStep], return_logits: bool,
                finished: list[str] = ()):
        """Run one step of this die's sequences (possibly none: the die still serves its experts),
        after forgetting the ``finished`` ones. Returns (results, measured seconds per phase,
        modeled 910C seconds per phase)."""
        self.sequences.finish(list(finished))
        seqs = [self.sequences.resolve(s) for s in seqs]
        for s in seqs:
            self._validate(s)
        with self._locks[microbatch], torch.inference_mode():
            reconnect = getattr(self.link, "reconnect_if_broken", None)
            if reconnect is not None:  # the fabric went away and maybe came back: re-form the group
                reconnect(RECONNECT_TIMEOUT_S)
            self.link.begin_step(step, microbatch)
            self.first_step = step if self.first_step is None else self.first_step
            self.last_step = step
            clock = PhaseClock()
            before = {layer: moe.token_counts.clone() for layer, moe in self.moe_layers.items()}
            start = time.perf_counter()
            results = self._run(seqs, return_logits, clock) if seqs else self._idle()
            clock.add("total", time.perf_counter() - start)
            for rnd in self.link.traffic:
                clock.add(rnd.kind, rnd.wait_s)
            expert_tokens = {layer: [int(moe.token_counts[int(e)] - before[layer][int(e)]) for e in moe.experts]
                             for layer, moe in self.moe_layers.items()}
            mtp = [r.mtp_positions for r in results] if len(self.model.mtp) else None
            modeled = forward_modeled_s(self.model, self.precision, seqs, self.link, expert_tokens, mtp)
            return results, clock.seconds, modeled

    def _validate(self, s: SequenceStep) -> None:
        cfg = self.model.cfg
        if not s.token_ids:
            raise FieldError("sequences.token_ids", f"sequence {s.seq_id!r}: empty")
        if any(not 0 <= t < cfg.vocab_size for t in s.token_ids):
            raise FieldError("sequences.token_ids", f"sequence {s.seq_id!r}: ids must be in [0, {cfg.vocab_size})")
        for name, token in (("following_token", s.following_token), ("draft_token", s.draft)):
            if token is not None and not 0 <= token < cfg.vocab_size:
                raise FieldError(f"sequences.{name}", f"sequence {s.seq_id!r}: must be in [0, {cfg.vocab_size})")
        if s.draft is not None and (not len(self.model.mtp) or s.skip_sampling):
            raise FieldError("sequences.draft_token", f"sequence {s.seq_id!r}: a draft needs speculative_tokens 1 "
                             "and a sampled step")
        if len(self.model.mtp) and s.skip_sampling and s.following_token is None:
            raise FieldError("sequences.following_token", f"sequence {s.seq_id!r}: with MTP a chunk that is not "
                             "sampled needs the token after it (the MTP module reads it)")
        end = s.start + len(s.token_ids) + (s.draft is not None)
        if end > cfg.max_position_embeddings:
            raise FieldError("sequences.start_position", f"sequence {s.seq_id!r}: positions up to {end} exceed the "
                             f"context limit {cfg.max_position_embeddings}")
        unknown = [b for b in s.block_table if not self.pool.allocator.is_allocated(b)]
        if unknown:
            raise FieldError("sequences.block_table", f"sequence {s.seq_id!r}: holds unallocated blocks {unknown[:4]}")

    def _run(self, seqs: list[SequenceStep], return_logits: bool, clock: PhaseClock) -> list[SequenceResult]:
        rows = [StepRow(s.token_ids, s.start, s.block_table, s.sampling, not (s.skip_sampling or return_logits),
                        s.draft, s.following_token, s.sampling.prompt_logprobs is not None) for s in seqs]
        stepped = paged_step(self.model, self.pool, rows)
        start = time.perf_counter()
        results = [self._result(s, r, return_logits) for s, r in zip(seqs, stepped)]
        clock.add("sample", time.perf_counter() - start)
        return results

    def _result(self, s: SequenceStep, r: RowResult, return_logits: bool) -> SequenceResult:
        """r.logits: at the sequence's last fed positions (every one with prompt log-probabilities)."""
        last = r.logits[-1 - (s.draft is not None):]  # [1 (+1 with a draft), V]: the last token's and the draft's
        prompt = self._prompt_logprobs(s, r.logits[:len(s.token_ids)])
        if return_logits:
            return SequenceResult(s.seq_id, [], last[0].clone(), [], prompt, None, r.mtp_positions)
        top = s.sampling.logprobs
        sampled = token_logprobs(last[:len(r.tokens)], r.tokens, top) if top is not None else []
        return SequenceResult(s.seq_id, r.tokens, None, sampled, prompt, r.draft, r.mtp_positions)

    @staticmethod
    def _prompt_logprobs(s: SequenceStep, logits: torch.Tensor) -> list[TokenLogprobs]:
        """Log-probabilities of token_ids[1:] (and of the following token), from logits [n, V]."""
        if s.sampling.prompt_logprobs is None:
            return []
        targets = s.token_ids[1:] + ([s.following_token] if s.following_token is not None else [])
        return token_logprobs(logits[:len(targets)], targets, s.sampling.prompt_logprobs) if targets else []

    def _idle(self) -> list[SequenceResult]:
        """No sequences this step: take part in every MoE layer's rounds with zero tokens."""
        empty = torch.zeros(0, 1, self.model.cfg.hidden_size)
        for moe in self.moe_layers.values():
            moe(empty)
        return []

    def expert_load(self, reset: bool) -> torch.Tensor:
        """[MoE layers, routed experts] tokens this die's experts computed."""
        counts = [moe.token_counts.clone() for moe in self.moe_layers.values()]
        if reset:
            for moe in self.moe_layers.values():
                moe.token_counts.zero_()
        return torch.stack(counts) if counts else torch.zeros(0, self.model.cfg.n_routed_experts, dtype=torch.long)


def pool_shape(model: DeepseekV3, block_size: int, pool_bytes: int) -> PoolShape:
    cfg = model.cfg
    layers = cfg.num_hidden_layers + len(model.mtp)  # the MTP module's KV is one more layer
    per_block = PoolShape(layers, 1, block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim).bytes_per_block
    if pool_bytes < per_block:
        raise FieldError("kv_pool_bytes", f"{pool_bytes} bytes hold no block of {per_block} bytes")
    return PoolShape(layers, pool_bytes // per_block, block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
