"""What one step of a plan costs on the modeled hardware: the cost model's operators at the
simulated model's dimensions, for the busiest die of the instance: in decode attention is data-parallel, so the step waits for the die
with the most work; in prefill the tokens are spread over the dies (SP) and the attention core's
heads too (TP). The MoE layers see every die's tokens through dispatch and combine.

Decode steps use the analytic decode model (simulator/decode.py) at the busiest die's own batch
and mean context, so a steady batch reproduces `cmx simulate` exactly; prefill steps price the
busiest die's chunks (new tokens and their context) with the prefill model's operators."""
from __future__ import annotations

import dataclasses

from cloudmatrix.costmodel.die import ASCEND_910C_DIE, DieEfficiency
from cloudmatrix.costmodel.ops import DEEPSEEK_V3, gemm_s, mla_attention_for
from cloudmatrix.instance.step import ScheduledChunk
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.simulator.decode import DecodeSetup, dense_mlp, paper_proportions, simulate_decode
from cloudmatrix.simulator.prefill import PrefillSetup, moe_phases, overlapped_s, projections

KV_ROUND = 64        # decode: the mean context is priced to the nearest 64 tokens (a cache key)
PREFILL_ROUND = 128  # prefill: tokens and context are priced to the nearest 128


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """Prices the steps of one instance (``dies`` dies, EP over all of them)."""

    role: str                        # "prefill" or "decode"
    dies: int
    eff: DieEfficiency
    int8: bool = True
    acceptance: float = 0.7
    microbatches: int = 0            # decode: 0 = the faster of one and two
    imbalance: float = 1.0
    round_slowdown: float = 1.0
    cfg: ModelConfig = DEEPSEEK_V3
    _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def step_s(self, chunks: list[ScheduledChunk]) -> float:
        """Seconds of a step that runs ``chunks`` (each knows its request's die)."""
        if self.role == "decode":
            seqs = per_die(chunks)
            # the step waits for the busiest die: the most sequences or the most context (the rest
            # cost less on both counts)
            busiest = {tuple(max(seqs.values(), key=lambda v: (v[0], v[1]))),
                       tuple(max(seqs.values(), key=lambda v: (v[1], v[0])))}
            return max(self._decode_s(n, kv / n, drafts > 0) for n, kv, _, drafts in busiest)
        # SP: the step's new tokens are spread over the instance's dies (the paper's prefill splits
        # a prompt's tokens, not whole prompts, across them), whichever die holds each request's KV
        tokens = -(-sum(c.slots for c in chunks) // self.dies)
        sampled = sum(c.sample for c in chunks)
        key = ("prefill", _round(tokens), sampled)
        if key not in self._cache:
            self._cache[key] = _prefill_rest_s(self, key[1], sampled)
        return self._cache[key] + self._attention_core_s(chunks)

    def _attention_core_s(self, chunks: list[ScheduledChunk]) -> float:
        """Prefill's attention core under SP -> TP -> SP: every die computes its share of the heads
        for all the instance's chunks, so the core's time is the whole instance's over the dies
        (the KV decompression of the context, kv_b, likewise)."""
        cfg, dtype, h = self.cfg, "int8" if self.int8 else "bf16", self.cfg.num_attention_heads
        context = sum(c.start + c.slots for c in chunks)
        kv_b = gemm_s(context, cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype=dtype, eff=self.eff)
        mla = mla_attention_for(cfg, [c.slots for c in chunks], [c.start + c.slots for c in chunks], absorbed=False,
                                eff=self.eff)
        layers = cfg.num_hidden_layers
        return layers * (kv_b + mla) / self.dies

    def _decode_s(self, batch: int, mean_kv: float, drafting: bool) -> float:
        key = (batch, max(1, round(mean_kv / KV_ROUND)) * KV_ROUND, drafting)
        if key not in self._cache:
            self._cache[key] = _decode_step_s(self, *key)
        return self._cache[key]


def per_die(chunks: list[ScheduledChunk]) -> dict[int, list[int]]:
    """die -> [sequences, their context after the step, new tokens, drafts verified]."""
    out: dict[int, list[int]] = {}
    for c in chunks:
        die = out.setdefault(c.request.die, [0, 0, 0, 0])
        die[0], die[1], die[2], die[3] = die[0] + 1, die[1] + c.start + c.slots, die[2] + c.slots, \
            die[3] + (c.draft is not None)
    return out


def _round(n: int) -> int:
    return max(1, -(-n // PREFILL_ROUND)) * PREFILL_ROUND if n > PREFILL_ROUND else n


def _decode_step_s(c: StepCosts, batch: int, kv_len: int, drafting: bool) -> float:
    setup = DecodeSetup(batch_per_die=batch, kv_len=kv_len, **paper_proportions(c.dies), int8=c.int8, mtp=drafting,
                        acceptance=c.acceptance,
                        microbatches=c.microbatches if batch >= 2 else 1, imbalance=c.imbalance,
                        round_slowdown=c.round_slowdown)
    return simulate_decode(setup, c.cfg, eff=c.eff).step_s


def _prefill_rest_s(c: StepCosts, tokens: int, sampled: int) -> float:
    """All but the attention core for the busiest die's ``tokens`` new tokens (SP): norm and the
    q / kv projections, o_proj, the MoE layer (EP over the instance, two microbatches, the SP <->
    TP rounds), the dense layers' FFN, and the LM head over the sampled positions."""
    cfg, eff, dtype = c.cfg, c.eff, "int8" if c.int8 else "bf16"
    attention = projections(cfg, tokens, dtype, ASCEND_910C_DIE, eff)
    # the paper's proportions at any size: one redundant copy per die, attention TP over the dies
    setup = PrefillSetup(prompt_len=tokens, tokens_per_die=tokens, dies=c.dies, int8=c.int8, imbalance=c.imbalance,
                         experts_per_die=-(-(cfg.n_routed_experts + c.dies) // c.dies),
                         attention_tp=max(t for t in (1, 2, 4, 8, 16, 32, 64, 128) if t <= c.dies))
    moe, rounds = moe_phases(cfg, setup, ASCEND_910C_DIE, eff)
    layer = overlapped_s(attention.total_s + moe.total_s, rounds.total_s, 2)
    dense = cfg.first_k_dense_replace * (attention.total_s
                                         + dense_mlp(cfg, tokens, dtype, ASCEND_910C_DIE, eff).total_s)
    head = gemm_s(max(1, sampled), cfg.hidden_size, cfg.vocab_size, dtype="bf16", eff=eff)
    return (cfg.num_hidden_layers - cfg.first_k_dense_replace) * layer + dense + head


@dataclasses.dataclass(frozen=True)
class GpuStepCosts:
    """The same, on Hopper GPUs (simulator/gpu.py: the H800's public operator figures): a decode
    step at the busiest GPU's batch and mean context; a prefill step at the busiest GPU's new
    tokens (attention is data-parallel per GPU there: a prompt stays on its GPU, no SP)."""

    role: str
    dies: int                        # GPUs of the instance (EP over all of them)
    hardware: str = "h800"
    acceptance: float = 0.7
    imbalance: float = 1.0
    cfg: ModelConfig = DEEPSEEK_V3
    _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def step_s(self, chunks: list[ScheduledChunk]) -> float:
        from cloudmatrix.simulator.gpu import GpuDecodeSetup, gpu_prefill_tokens_per_s, simulate_gpu_decode

        per_gpu = per_die(chunks)
        copies = -(-(self.cfg.n_routed_experts + self.dies) // self.dies)  # one redundant copy per GPU
        if self.role == "decode":
            n, kv, _, _ = max(per_gpu.values(), key=lambda v: (v[0], v[1]))
            key = (n, max(1, round(kv / n / KV_ROUND)) * KV_ROUND, any(c.draft is not None for c in chunks))
            if key not in self._cache:
                setup = GpuDecodeSetup(batch=n, kv_len=key[1], ep=self.dies, experts_per_gpu=copies, mtp=key[2],
                                       acceptance=self.acceptance, microbatches=2 if n >= 2 else 1,
                                       imbalance=self.imbalance)
                self._cache[key] = simulate_gpu_decode(setup, self.hardware, self.cfg).step_s
            return self._cache[key]
        tokens = _round(max(v[2] for v in per_gpu.values()))
        if tokens not in self._cache:
            setup = PrefillSetup(prompt_len=tokens, tokens_per_die=tokens, dies=self.dies, experts_per_die=copies,
                                 attention_tp=1, imbalance=self.imbalance)
            self._cache[tokens] = tokens / gpu_prefill_tokens_per_s(setup, self.hardware)
        return self._cache[tokens]
