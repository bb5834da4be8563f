"""Prefill on CloudMatrix384 as the paper deploys DeepSeek-R1: instances of 32 dies (16 NPUs),
MoE EP32 (each die: 8 routed experts + 1 redundant copy, and the shared expert for its own
tokens), INT8, 4K prompts, 16,384 tokens per NPU per batch, two microbatches, and context-cache
reuse with the cached blocks' KV read from the EMS pool over UB.

One batch on one die, from the cost model's operators; docs/simulator.md lists the assumptions.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from cloudmatrix.costmodel import ub
from cloudmatrix.costmodel.die import ASCEND_910C_DIE, PAPER_EFFICIENCY, DieEfficiency, DieSpec
from cloudmatrix.costmodel.ops import (
    DEEPSEEK_V3,
    PhaseCost,
    expert_mlp_phase,
    gemm_s,
    mla_attention_for,
    vector_s,
)
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.simulator.decode import ACT_BYTES, DIES_PER_NPU, NPU_TERA_OPS, dense_mlp
from cloudmatrix.simulator.experts import step_fluctuation

KV_BYTES = 2  # latent KV values in BF16, in HBM and in the pool


@dataclasses.dataclass(frozen=True)
class PrefillSetup:
    prompt_len: int = 4096
    tokens_per_die: int = 8192       # 16,384 per NPU per batch (PAPERS.md s2 prefill table)
    dies: int = 32                   # one instance: EP32
    experts_per_die: int = 9         # 8 routed + 1 redundant copy (PAPERS.md s2)
    attention_tp: int = 32           # SP -> TP -> SP attention: the TP stage's degree (assumption)
    int8: bool = True
    microbatches: int = 2            # 2: one microbatch's dispatch / combine overlap the other's compute
    imbalance: float = 1.0           # EPLB's residual: busiest die's expected routed rows / the mean
                                     # (1 = perfect EPLB; a step's fluctuation comes on top)
    reuse: float = 0.0               # share of each prompt whose KV the context cache already holds

    def __post_init__(self) -> None:
        checks = {"prompt_len": self.prompt_len >= 1, "dies": self.dies >= 2,
                  "tokens_per_die": self.tokens_per_die >= self.prompt_len
                  and self.tokens_per_die % self.prompt_len == 0,
                  "experts_per_die": self.experts_per_die >= 1, "microbatches": self.microbatches in (1, 2),
                  "attention_tp": 1 <= self.attention_tp <= self.dies and 128 % self.attention_tp == 0,
                  "imbalance": self.imbalance >= 1.0, "reuse": 0.0 <= self.reuse < 1.0}
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"{field}: out of range ({getattr(self, field)!r})")

    @property
    def dtype(self) -> str:
        return "int8" if self.int8 else "bf16"

    @property
    def sequences(self) -> int:
        return self.tokens_per_die // self.prompt_len

    @property
    def new_per_seq(self) -> int:
        """Prompt tokens computed here (the cached prefix is read from the pool)."""
        return self.prompt_len - round(self.prompt_len * self.reuse)


@dataclasses.dataclass(frozen=True)
class PrefillResult:
    setup: PrefillSetup
    batch_s: float                   # one batch on one die: cache load, every layer, the LM head
    layer_s: float                   # one MoE layer, microbatches overlapped as configured
    cache_load_s: float              # reading the cached prefixes' KV from the pool over UB
    compute: PhaseCost               # one MoE layer's compute
    rounds: PhaseCost                # one MoE layer's dispatch and combine

    @property
    def tokens_per_s_per_npu(self) -> float:
        """Prompt tokens served per second per NPU, cached ones included."""
        return DIES_PER_NPU * self.setup.tokens_per_die / self.batch_s

    @property
    def tokens_per_s_per_tflops(self) -> float:
        return self.tokens_per_s_per_npu / NPU_TERA_OPS


def projections(cfg: ModelConfig, tokens: int, dtype: str, die: DieSpec, eff: DieEfficiency) -> PhaseCost:
    """What attention costs per new token: the norm, the q / kv projections and o_proj."""
    h = cfg.num_attention_heads
    return (PhaseCost("attention")
            .add("norm", vector_s(2 * ACT_BYTES * tokens * cfg.hidden_size, die=die, eff=eff))
            .add("q_a", gemm_s(tokens, cfg.hidden_size, cfg.q_lora_rank, dtype=dtype, die=die, eff=eff))
            .add("q_b", gemm_s(tokens, cfg.q_lora_rank, h * cfg.qk_head_dim, dtype=dtype, die=die, eff=eff))
            .add("kv_a", gemm_s(tokens, cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=dtype,
                                die=die, eff=eff))
            .add("o_proj", gemm_s(tokens, h * cfg.v_head_dim, cfg.hidden_size, dtype=dtype, die=die, eff=eff)))


def attention_phase(cfg: ModelConfig, setup: PrefillSetup, die: DieSpec, eff: DieEfficiency) -> PhaseCost:
    """MLA without absorption: projections of the new tokens, every token's K and V decompressed
    from the latent KV (kv_b), the causal attention core, o_proj."""
    seqs, new, h, dtype = setup.sequences, setup.new_per_seq, cfg.num_attention_heads, setup.dtype
    kv_tokens = seqs * setup.prompt_len
    return (projections(cfg, seqs * new, dtype, die, eff)
            .add("kv_b", gemm_s(kv_tokens, cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                dtype=dtype, die=die, eff=eff))
            .add("mla", mla_attention_for(cfg, [new] * seqs, [setup.prompt_len] * seqs, absorbed=False, die=die,
                                          eff=eff)))


def ub_rounds(kind: str, rows: float, ep: int, setup: PrefillSetup, cfg: ModelConfig) -> float:
    """One dispatch or combine round over UB for the busiest die's ``rows``: at the bandwidth
    DeepEP-Ascend's normal (large-batch) kernels reach on the A3 SuperPOD at this EP size, plus
    the slowest link's latency (the decode's rounds use the paper's own low-latency table)."""
    from cloudmatrix.simulator.hardware import DEEPEP_ASCEND_NORMAL

    nbytes = rows * ub.row_bytes(kind, cfg.hidden_size, setup.int8)
    return ub.busiest_round_s(0.0, kind, ep) + DEEPEP_ASCEND_NORMAL.round_s(kind, nbytes, ep)


def moe_phases(cfg: ModelConfig, setup: PrefillSetup, die: DieSpec, eff: DieEfficiency,
               rounds_s: Callable = ub_rounds) -> tuple[PhaseCost, PhaseCost]:
    """(compute, rounds) of one MoE layer: gate, the busiest die's routed experts, the shared
    expert on the die's own tokens, the routed rows quantized (INT8), permuted into expert order
    before dispatch and back after combine; dispatch and combine of the routed rows."""
    tokens = setup.sequences * setup.new_per_seq
    rows = tokens * cfg.num_experts_per_tok             # routed rows this die sends (and, on average, gets)
    busiest = rows * setup.imbalance * step_fluctuation(rows, setup.dies)
    row_elem = 1 if setup.int8 else ACT_BYTES
    per_expert = [round(busiest / setup.experts_per_die)] * setup.experts_per_die
    shared_cfg = dataclasses.replace(cfg, moe_intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts)
    compute = (PhaseCost("moe")
               .add("gate", gemm_s(tokens, cfg.hidden_size, cfg.n_routed_experts, dtype="bf16", die=die, eff=eff))
               # per token: read BF16, write INT8 and its scale (none in BF16)
               .add("quantize", vector_s(tokens * (cfg.hidden_size * (ACT_BYTES + 1) + 4), die=die, eff=eff)
                    if setup.int8 else 0.0)
               # the rows read and written in expert order; the combined rows back in token order
               .add("permute", vector_s(2 * rows * cfg.hidden_size * row_elem, die=die, eff=eff))
               .extend(expert_mlp_phase(cfg, per_expert, setup.dtype, die=die, eff=eff))
               .add("unpermute", vector_s(2 * rows * cfg.hidden_size * ACT_BYTES, die=die, eff=eff))
               .extend(dataclasses.replace(expert_mlp_phase(shared_cfg, [tokens], setup.dtype, die=die, eff=eff),
                                           name="shared"))
               .add("weighted_sum", vector_s(ACT_BYTES * cfg.hidden_size * (rows + 2 * tokens), die=die, eff=eff)))
    remote = 1.0 - 1.0 / setup.dies
    rounds = sp_tp_sp_rounds(cfg, setup)
    for kind in ub.KINDS:
        rounds = rounds.add(kind, rounds_s(kind, max(rows * remote, busiest), setup.dies, setup, cfg))
    return compute, rounds


def sp_tp_sp_rounds(cfg: ModelConfig, setup: PrefillSetup) -> PhaseCost:
    """The attention's stage changes (PAPERS.md s2: SP -> TP -> SP): every die gathers the TP
    group's q / kv latents (q_lora_rank + kv_lora_rank + qk_rope_head_dim values per token) for its
    share of the heads, then sends each head's output rows back to the die that owns the token.
    Bulk transfers at the UB port rate (``ub.bulk_collective_s``)."""
    tp, tokens = setup.attention_tp, setup.sequences * setup.new_per_seq
    latent = cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim
    gather = (tp - 1) * tokens * latent * ACT_BYTES
    scatter = (tp - 1) * tokens * (cfg.num_attention_heads // tp) * cfg.v_head_dim * ACT_BYTES
    return (PhaseCost("rounds")
            .add("sp_to_tp", ub.bulk_collective_s(gather, tp))
            .add("tp_to_sp", ub.bulk_collective_s(scatter, tp)))


def overlapped_s(compute_s: float, rounds_s: float, microbatches: int) -> float:
    """Two microbatches: one's rounds run under the other's compute, except the pipeline's fill
    (the first microbatch's share of the shorter of the two)."""
    if microbatches == 1:
        return compute_s + rounds_s
    return max(compute_s, rounds_s) + min(compute_s, rounds_s) / microbatches


def cache_load_s(cfg: ModelConfig, setup: PrefillSetup) -> float:
    """The cached prefixes' latent KV (every layer) read from the EMS pool into HBM over UB
    (``ub.pool_transfer_s``, as the serving path models it), before the batch."""
    cached_tokens = setup.sequences * (setup.prompt_len - setup.new_per_seq)
    nbytes = cached_tokens * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * KV_BYTES
    return ub.pool_transfer_s(nbytes)


def simulate_prefill(setup: PrefillSetup = PrefillSetup(), cfg: ModelConfig = DEEPSEEK_V3,
                     die: DieSpec = ASCEND_910C_DIE, eff: DieEfficiency = PAPER_EFFICIENCY,
                     rounds_s: Callable = ub_rounds) -> PrefillResult:
    """One batch on one die. ``rounds_s(kind, rows, ep, setup, cfg)``: the seconds of one dispatch
    or combine round for the busiest die's rows (default: over UB)."""
    attention = attention_phase(cfg, setup, die, eff)
    moe, rounds = moe_phases(cfg, setup, die, eff, rounds_s)
    compute = PhaseCost("compute").extend(attention).extend(moe)
    layer = overlapped_s(compute.total_s, rounds.total_s, setup.microbatches)
    tokens = setup.sequences * setup.new_per_seq
    dense = cfg.first_k_dense_replace * (attention.total_s + dense_mlp(cfg, tokens, setup.dtype, die, eff).total_s)
    head = gemm_s(setup.sequences, cfg.hidden_size, cfg.vocab_size, dtype="bf16", die=die, eff=eff)
    load = cache_load_s(cfg, setup)
    batch = load + (cfg.num_hidden_layers - cfg.first_k_dense_replace) * layer + dense + head
    return PrefillResult(setup, batch, layer, load, compute, rounds)
