"""Decode on CloudMatrix384 as the paper deploys DeepSeek-R1: one instance of 320 dies, attention
DP320 (every die runs its own batch), MoE EP320 (one expert per die: 256 routed, 32 shared-expert
replicas, 32 redundant routed copies), INT8, MTP with one draft token, one or two microbatches
(whichever is faster for the batch).

A step on one die is built from the cost model's operators (costmodel/ops.py, ub.py). The
assumptions are the fields of ``DecodeSetup`` and the constants below; the few physical constants
the operators do not give are calibrated on a declared training subset of the paper's
observations (simulator/calibration.py); docs/simulator.md lists each with its source.
"""
from __future__ import annotations

import dataclasses
import math

from cloudmatrix.costmodel import ub
from cloudmatrix.costmodel.die import ASCEND_910C_DIE, PAPER_EFFICIENCY, DieEfficiency, DieSpec
from cloudmatrix.costmodel.ops import (
    DEEPSEEK_V3,
    PhaseCost,
    expert_mlp_phase,
    gemm_s,
    grouped_gemm_s,
    mla_attention_for,
    vector_s,
)
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.simulator.experts import step_fluctuation

DIES_PER_NPU = 2
# The paper's "tokens/s per TFLOPS" divides by the NPU's INT8 peak: 2 dies x 752 TOPS (its
# 1,943 tok/s at 1.29 per TFLOPS, 5,655 at 3.76 and 6,688 at 4.45 all give ~1,504).
NPU_TERA_OPS = DIES_PER_NPU * ASCEND_910C_DIE.int8_ops / 1e12
ACT_BYTES = 2  # BF16 activations between operators
# The paper's decode core split (PAPERS.md s2, decode microbatching): the attention path runs on
# 16 of 24 cube cores and 32 of 48 vector cores, the MoE path on the rest.
ATTENTION_CORE_SHARE = 16 / 24


@dataclasses.dataclass(frozen=True)
class DecodeSetup:
    batch_per_die: int = 48          # sequences per die (the paper's batch 96 per NPU)
    kv_len: int = 4096               # mean KV length of a sequence in the batch
    dies: int = 320                  # the instance: DP degree of attention = EP degree of the MoE
    shared_replicas: int = 32        # dies hosting a copy of the shared expert
    redundant: int = 32              # extra copies of hot routed experts (EPLB)
    int8: bool = True                # W8A8 GEMMs and INT8 dispatch (False: BF16 both)
    mtp: bool = True                 # one speculative token per step
    acceptance: float = 0.7          # MTP draft acceptance (PAPERS.md s2: ~70%)
    microbatches: int = 0            # 2: attention and MoE paths of two microbatches overlap; 1: none;
                                     # 0: the faster of the two for this batch, as a deployment would
    imbalance: float = 1.0           # EPLB's residual: busiest routed-expert die's expected rows / the
                                     # mean (1 = perfect EPLB; a step's fluctuation comes on top)
    round_slowdown: float = 1.0      # dispatch / combine on the MoE path's core partition (two
                                     # microbatches) over the same round on the whole die

    def __post_init__(self) -> None:
        checks = {"batch_per_die": self.batch_per_die >= 1, "kv_len": self.kv_len >= 1,
                  "dies": self.dies >= 2, "shared_replicas": 1 <= self.shared_replicas < self.dies,
                  "redundant": self.redundant >= 0, "acceptance": 0.0 <= self.acceptance <= 1.0,
                  "microbatches": self.microbatches in (0, 1, 2), "imbalance": self.imbalance >= 1.0,
                  "round_slowdown": self.round_slowdown >= 1.0}
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"{field}: out of range ({getattr(self, field)!r})")
        if self.microbatches == 2 and self.batch_per_die < 2:
            raise ValueError("batch_per_die: two microbatches need at least 2 sequences per die")

    @property
    def dtype(self) -> str:
        return "int8" if self.int8 else "bf16"

    @property
    def queries_per_seq(self) -> int:
        """Tokens a sequence runs through the main model per step: the last token (+ the draft)."""
        return 2 if self.mtp else 1

    @property
    def tokens_per_step(self) -> float:
        """Tokens a sequence gains per step: 1, plus the draft when it is accepted."""
        return 1.0 + (self.acceptance if self.mtp else 0.0)


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    setup: DecodeSetup
    step_s: float                    # one decode step of the whole batch (every layer, MTP, heads)
    layer_s: float                   # one MoE layer, microbatches overlapped as configured
    attention: PhaseCost             # one MoE layer's attention path, whole batch, whole die
    moe: PhaseCost                   # one MoE layer's MoE path, whole batch, whole die

    @property
    def tpot_s(self) -> float:
        return self.step_s / self.setup.tokens_per_step

    @property
    def tokens_per_s_per_npu(self) -> float:
        return DIES_PER_NPU * self.setup.batch_per_die / self.tpot_s

    @property
    def tokens_per_s_per_tflops(self) -> float:
        return self.tokens_per_s_per_npu / NPU_TERA_OPS


def attention_path(cfg: ModelConfig, batch: int, queries: int, kv_len: int, dtype: str, die: DieSpec,
                   eff: DieEfficiency) -> PhaseCost:
    """MLA for ``batch`` sequences of ``queries`` new tokens each (weights absorbed, latent KV):
    norm, q_a / q_b / kv_a projections, W_UK absorption, the attention core, W_UV, o_proj."""
    tokens, h = batch * queries, cfg.num_attention_heads
    norm_bytes = 2 * ACT_BYTES * tokens * cfg.hidden_size  # read + write
    return (PhaseCost("attention")
            .add("norm", vector_s(norm_bytes, die=die, eff=eff))
            .add("q_a", gemm_s(tokens, cfg.hidden_size, cfg.q_lora_rank, dtype=dtype, die=die, eff=eff))
            .add("q_b", gemm_s(tokens, cfg.q_lora_rank, h * cfg.qk_head_dim, dtype=dtype, die=die, eff=eff))
            .add("kv_a", gemm_s(tokens, cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=dtype,
                                die=die, eff=eff))
            # per head [tokens, 128] x [128, 512]: BF16 (the absorbed weights are not quantized)
            .add("absorb_k", grouped_gemm_s([tokens] * h, cfg.qk_nope_head_dim, cfg.kv_lora_rank, "bf16",
                                            die=die, eff=eff))
            .add("mla", mla_attention_for(cfg, [queries] * batch, [kv_len] * batch, absorbed=True, die=die,
                                          eff=eff))
            .add("absorb_v", grouped_gemm_s([tokens] * h, cfg.kv_lora_rank, cfg.v_head_dim, "bf16", die=die,
                                            eff=eff))
            .add("o_proj", gemm_s(tokens, h * cfg.v_head_dim, cfg.hidden_size, dtype=dtype, die=die, eff=eff)))


def paper_proportions(dies: int) -> dict[str, int]:
    """An instance of ``dies`` dies laid out as the paper's 320: a tenth of them hosting shared-expert
    replicas (at least one), and as many redundant routed copies (32 + 32 of 320)."""
    return {"dies": dies, "shared_replicas": max(1, dies // 10), "redundant": dies // 10}


def experts_per_die(setup: DecodeSetup, cfg: ModelConfig) -> int:
    """Routed-expert copies on each routed-expert die (1 in the paper's EP320)."""
    return math.ceil((cfg.n_routed_experts + setup.redundant) / (setup.dies - setup.shared_replicas))


def busiest_expert_tokens(tokens_per_die: int, setup: DecodeSetup, cfg: ModelConfig) -> float:
    """Tokens the busiest expert die computes: a routed-expert die (the mean rows x the placement's
    residual x the step's fluctuation) or a shared-expert die (every token of the instance, spread
    evenly over the replicas)."""
    routed_dies = setup.dies - setup.shared_replicas
    routed = setup.dies * tokens_per_die * cfg.num_experts_per_tok / routed_dies
    shared = setup.dies * tokens_per_die / setup.shared_replicas
    return max(routed * setup.imbalance * step_fluctuation(routed, routed_dies), shared)


def moe_path(cfg: ModelConfig, tokens: int, setup: DecodeSetup, die: DieSpec, eff: DieEfficiency,
             on_partition: bool = False) -> PhaseCost:
    """Gate, dispatch (top-k routed rows + one shared-expert row per token), this die's expert on
    the busiest die's tokens, combine, and the weighted sum. ``on_partition``: the path runs on the
    MoE cores of a two-microbatch split, its rounds ``setup.round_slowdown`` times slower."""
    rows = cfg.num_experts_per_tok + 1  # per token: top-8 routed + the shared expert
    busiest, copies = busiest_expert_tokens(tokens, setup, cfg), experts_per_die(setup, cfg)
    remote = 1.0 - 1.0 / setup.dies   # a row addressed to this die stays here
    sizes = {k: ub.row_bytes(k, cfg.hidden_size, setup.int8) for k in ub.KINDS}
    out_of = {k: max(tokens * rows * sizes[k] * remote, busiest * sizes[k]) for k in ub.KINDS}
    weighted_sum = ACT_BYTES * tokens * cfg.hidden_size * (rows + 1)
    slowdown = setup.round_slowdown if on_partition else 1.0
    return (PhaseCost("moe")
            .add("gate", gemm_s(tokens, cfg.hidden_size, cfg.n_routed_experts, dtype="bf16", die=die, eff=eff))
            .add("dispatch", slowdown * ub.busiest_round_s(out_of["dispatch"], "dispatch", setup.dies))
            .extend(expert_mlp_phase(cfg, [round(busiest / copies)] * copies, setup.dtype, die=die, eff=eff))
            .add("combine", slowdown * ub.busiest_round_s(out_of["combine"], "combine", setup.dies))
            .add("weighted_sum", vector_s(weighted_sum, die=die, eff=eff)))


def dense_mlp(cfg: ModelConfig, tokens: int, dtype: str, die: DieSpec, eff: DieEfficiency) -> PhaseCost:
    """One of the first dense layers' SwiGLU FFN (18,432 wide), on the die's own tokens."""
    dense_cfg = dataclasses.replace(cfg, moe_intermediate_size=cfg.intermediate_size)
    return expert_mlp_phase(dense_cfg, [tokens], dtype, die=die, eff=eff)


def partition(die: DieSpec, share: float) -> DieSpec:
    """The die as one microbatch path sees it: ``share`` of the cube and vector cores, the whole
    HBM bandwidth. Splitting the bandwidth as the cores are split was tried: it turns the paper's
    microbatch gains (x1.06-1.09) into losses (x0.84-0.98) under any calibration within bounds,
    so the paper's own rows rule it out (docs/simulator.md)."""
    return dataclasses.replace(die, fp16_flops=die.fp16_flops * share, int8_ops=die.int8_ops * share)


def moe_layer_s(cfg: ModelConfig, batch: int, setup: DecodeSetup, die: DieSpec, eff: DieEfficiency) -> float:
    """One MoE layer for ``batch`` sequences per die. Two microbatches: each path runs on its core
    partition, so a layer takes twice the slower path at half the batch."""
    q = setup.queries_per_seq
    if setup.microbatches == 1:
        return (attention_path(cfg, batch, q, setup.kv_len, setup.dtype, die, eff).total_s
                + moe_path(cfg, batch * q, setup, die, eff).total_s)
    halves = (batch // 2, batch - batch // 2)
    attn_die, moe_die = partition(die, ATTENTION_CORE_SHARE), partition(die, 1.0 - ATTENTION_CORE_SHARE)
    attention = sum(attention_path(cfg, b, q, setup.kv_len, setup.dtype, attn_die, eff).total_s for b in halves)
    moe = sum(moe_path(cfg, b * q, setup, moe_die, eff, on_partition=True).total_s for b in halves)
    return max(attention, moe)


def simulate_decode(setup: DecodeSetup = DecodeSetup(), cfg: ModelConfig = DEEPSEEK_V3,
                    die: DieSpec = ASCEND_910C_DIE, eff: DieEfficiency = PAPER_EFFICIENCY) -> DecodeResult:
    """One decode step on one die: the MoE layers, the dense layers (not pipelined), the MTP
    module (its projection, one MoE layer over the batch's drafts, its head) and the LM head.
    ``microbatches`` 0: the faster of one and two (one only, below 2 sequences per die); the
    result's setup says which."""
    if setup.microbatches == 0:
        choices = (1, 2) if setup.batch_per_die >= 2 else (1,)
        results = [_step(dataclasses.replace(setup, microbatches=m), cfg, die, eff) for m in choices]
        return min(results, key=lambda r: r.step_s)
    return _step(setup, cfg, die, eff)


def _step(setup: DecodeSetup, cfg: ModelConfig, die: DieSpec, eff: DieEfficiency) -> DecodeResult:
    b, q = setup.batch_per_die, setup.queries_per_seq
    tokens = b * q
    layer = moe_layer_s(cfg, b, setup, die, eff)
    attention = attention_path(cfg, b, q, setup.kv_len, setup.dtype, die, eff)
    dense = cfg.first_k_dense_replace * (attention.total_s + dense_mlp(cfg, tokens, setup.dtype, die, eff).total_s)
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    # LM head in BF16 (assumption: the paper quantizes "the heavy matmuls" and names no exception;
    # serving stacks keep the vocabulary projection in BF16), then sampling over fp32 logits
    head = gemm_s(tokens, cfg.hidden_size, cfg.vocab_size, dtype="bf16", die=die, eff=eff) \
        + vector_s(4 * tokens * cfg.vocab_size, die=die, eff=eff)
    step = moe_layers * layer + dense + head
    if setup.mtp:
        draft = dataclasses.replace(setup, mtp=False)  # the MTP module runs one token per sequence
        step += (gemm_s(b, 2 * cfg.hidden_size, cfg.hidden_size, dtype=setup.dtype, die=die, eff=eff)
                 + moe_layer_s(cfg, b, draft, die, eff)
                 + gemm_s(b, cfg.hidden_size, cfg.vocab_size, dtype="bf16", die=die, eff=eff))
    return DecodeResult(setup, step, layer, attention, moe_path(cfg, tokens, setup, die, eff))


def largest_batch_within(tpot_slo_s: float, setup: DecodeSetup = DecodeSetup(), max_batch_per_die: int = 512,
                         step: int = 1, **model) -> DecodeResult | None:
    """The largest batch per die, of the multiples of ``step``, whose TPOT meets ``tpot_slo_s``
    (TPOT grows with the batch), or None when even the smallest batch misses it."""
    smallest = 2 if setup.microbatches == 2 else 1  # 0 chooses one microbatch at 1 sequence per die
    best = None
    low, high = -(-smallest // step), max_batch_per_die // step  # in units of step
    while low <= high:
        mid = (low + high) // 2
        result = simulate_decode(dataclasses.replace(setup, batch_per_die=mid * step), **model)
        if result.tpot_s <= tpot_slo_s:
            best, low = result, mid + 1
        else:
            high = mid - 1
    return best
