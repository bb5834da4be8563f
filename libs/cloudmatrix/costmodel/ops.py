"""Operator costs on one 910C die: the roofline with the paper's operator efficiencies.

Every operator costs max(FLOPs / (peak x efficiency), bytes / (HBM bandwidth x efficiency)) plus a
launch overhead; an operator with no work is not launched and costs nothing. Constants and their
sources live in die.py; formulas and the reasoning behind the byte counts in docs/costmodel.md.
Shapes follow DeepSeek-V3's config.json names (`ModelConfig`). Modeled seconds only.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cloudmatrix.costmodel.die import (
    ASCEND_910C_DIE,
    PAPER_EFFICIENCY,
    DieEfficiency,
    DieSpec,
    check_nonnegative,
    dtype_info,
)
from cloudmatrix.model.config import ModelConfig

# DeepSeek-V3 / R1 at full size (PAPERS.md s2 config; max_position_embeddings from the released
# config.json, not costed), for modeling the real deployment.
DEEPSEEK_V3 = ModelConfig(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, n_routed_experts=256, num_experts_per_tok=8,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536,
    n_shared_experts=1, n_group=8, topk_group=4, first_k_dense_replace=3, routed_scaling_factor=2.5,
    max_position_embeddings=163840, model_id="deepseek-v3",
)
SCALE_BYTES = 4      # one fp32 quantization scale per token (activations) or channel (weights)
OUT_BYTES = 2        # GEMM outputs are written in BF16, also after INT8 dequantization (assumption)


def _op_s(flops: float, nbytes: float, compute_rate: float, memory_rate: float, eff: DieEfficiency) -> float:
    if flops == 0 and nbytes == 0:
        return 0.0
    return max(flops / compute_rate, nbytes / memory_rate) + eff.launch_s


def grouped_gemm_s(tokens_per_expert: Sequence[int], k: int, n: int, dtype: str = "bf16", *,
                   die: DieSpec = ASCEND_910C_DIE, eff: DieEfficiency = PAPER_EFFICIENCY) -> float:
    """One grouped-GEMM launch: expert e multiplies [t_e, K] by its own [K, N] weight.

    Experts with no tokens are skipped (their weights are not read). int8 is W8A8: int8 inputs
    and weights with fp32 per-token / per-channel scales; the output is BF16.
    """
    for i, t in enumerate(tokens_per_expert):
        check_nonnegative(**{f"tokens_per_expert[{i}]": t})
    check_nonnegative(k=k, n=n)
    elem, peak = dtype_info(dtype, die)
    tokens = sum(tokens_per_expert)
    experts = sum(1 for t in tokens_per_expert if t > 0)
    if tokens * k * n == 0:
        return 0.0
    scale_bytes = SCALE_BYTES * (tokens + experts * n) if dtype == "int8" else 0
    nbytes = elem * (tokens * k + experts * k * n) + OUT_BYTES * tokens * n + scale_bytes
    gemm_eff = eff.int8_gemm if dtype == "int8" else eff.fp16_gemm
    return _op_s(2.0 * tokens * k * n, nbytes, peak * gemm_eff, die.hbm_bandwidth * eff.stream_memory, eff)


def gemm_s(m: int, k: int, n: int, *, dtype: str = "bf16",
           die: DieSpec = ASCEND_910C_DIE, eff: DieEfficiency = PAPER_EFFICIENCY) -> float:
    """[M, K] x [K, N] on the cube unit; dtype int8 | fp16 | bf16 | fp32 (fp32 models as BF16)."""
    check_nonnegative(m=m)
    return grouped_gemm_s([m], k, n, dtype, die=die, eff=eff)


def vector_s(nbytes: int, *, die: DieSpec = ASCEND_910C_DIE, eff: DieEfficiency = PAPER_EFFICIENCY) -> float:
    """A vector-core op (norm, activation, quantization, sampling): HBM bytes read + written."""
    check_nonnegative(nbytes=nbytes)
    return _op_s(0.0, nbytes, 1.0, die.hbm_bandwidth * eff.stream_memory, eff)


def _query_lens(batch_q_tokens: int | Sequence[int], kv_lens: Sequence[int]) -> list[int]:
    if isinstance(batch_q_tokens, int):
        check_nonnegative(batch_q_tokens=batch_q_tokens)
        if not kv_lens and batch_q_tokens == 0:
            return []
        if not kv_lens or batch_q_tokens % len(kv_lens):
            raise ValueError(f"batch_q_tokens={batch_q_tokens} does not split evenly over "
                             f"{len(kv_lens)} sequences; pass one count per sequence")
        return [batch_q_tokens // len(kv_lens)] * len(kv_lens)
    if len(batch_q_tokens) != len(kv_lens):
        raise ValueError(f"batch_q_tokens has {len(batch_q_tokens)} entries but kv_lens has {len(kv_lens)}")
    return list(batch_q_tokens)


def _checked_query_lens(batch_q_tokens: int | Sequence[int], kv_lens: Sequence[int]) -> list[int]:
    for i, kv_len in enumerate(kv_lens):
        check_nonnegative(**{f"kv_lens[{i}]": kv_len})
    q_lens = _query_lens(batch_q_tokens, kv_lens)
    for i, (q, kv_len) in enumerate(zip(q_lens, kv_lens)):
        check_nonnegative(**{f"batch_q_tokens[{i}]": q})
        if q > kv_len:
            raise ValueError(f"batch_q_tokens: sequence {i} has {q} new tokens but kv_lens[{i}]={kv_len} "
                             f"(kv_lens must include the new tokens)")
    return q_lens


def _attended_keys(q: int, kv_len: int) -> int:
    """Causal: the q new tokens are the last q of the kv_len cached ones and see their prefix."""
    return q * (kv_len - q) + q * (q + 1) // 2


def mla_attention_s(batch_q_tokens: int | Sequence[int], kv_lens: Sequence[int], heads: int, q_dim: int,
                    v_dim: int, kv_dim: int, *, absorbed: bool, dtype: str = "bf16",
                    die: DieSpec = ASCEND_910C_DIE, eff: DieEfficiency = PAPER_EFFICIENCY) -> float:
    """The attention core of MLA (QK^T, softmax, PV) over a batch of sequences, causal.

    batch_q_tokens: total new query tokens, split evenly over the sequences (decode: batch, MTP:
    2 x batch), or one count per sequence. kv_lens[i] counts sequence i's keys including its new
    tokens. q_dim / v_dim: per-head score and value widths. absorbed=True (decode): all heads share
    one cached row of kv_dim values per token (kv_lora_rank + qk_rope_head_dim). absorbed=False
    (prefill): each head reads its own decompressed key (q_dim) and value (v_dim); kv_dim unused.
    """
    check_nonnegative(heads=heads, q_dim=q_dim, v_dim=v_dim, kv_dim=kv_dim)
    q_lens = _checked_query_lens(batch_q_tokens, kv_lens)
    if dtype == "int8":
        raise ValueError("dtype='int8': MLA is costed in BF16/FP16 (the paper's MLA efficiencies are "
                         "fractions of that peak); pass bf16, fp16 or fp32")
    elem, peak = dtype_info(dtype, die)
    keys = sum(_attended_keys(q, kv_len) for q, kv_len in zip(q_lens, kv_lens))
    kv_row = kv_dim if absorbed else heads * (q_dim + v_dim)
    nbytes = elem * (sum(kv_lens) * kv_row + sum(q_lens) * heads * (q_dim + v_dim))  # KV read once; q in, o out
    flops = 2.0 * heads * keys * (q_dim + v_dim)
    return _op_s(flops, nbytes, peak * eff.mla_compute, die.hbm_bandwidth * eff.mla_memory, eff)


def mla_attention_for(cfg: ModelConfig, batch_q_tokens: int | Sequence[int], kv_lens: Sequence[int], *,
                      absorbed: bool = True, dtype: str = "bf16", die: DieSpec = ASCEND_910C_DIE,
                      eff: DieEfficiency = PAPER_EFFICIENCY) -> float:
    """`mla_attention_s` with the widths taken from a DeepSeek-V3 config (one die, all heads)."""
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 512 + 64 cached values per token
    q_dim, v_dim = (latent, cfg.kv_lora_rank) if absorbed else (cfg.qk_head_dim, cfg.v_head_dim)
    return mla_attention_s(batch_q_tokens, kv_lens, cfg.num_attention_heads, q_dim, v_dim, latent,
                           absorbed=absorbed, dtype=dtype, die=die, eff=eff)


@dataclasses.dataclass(frozen=True)
class PhaseCost:
    """Modeled seconds of a phase: named operators that run one after another on one die."""

    name: str
    ops: tuple[tuple[str, float], ...] = ()

    def add(self, op: str, seconds: float) -> PhaseCost:
        check_nonnegative(seconds=seconds)
        return dataclasses.replace(self, ops=self.ops + ((op, seconds),))

    def extend(self, other: PhaseCost) -> PhaseCost:
        """Append another phase's operators, named `<other.name>.<op>`."""
        return dataclasses.replace(self, ops=self.ops + tuple((f"{other.name}.{op}", s) for op, s in other.ops))

    @property
    def total_s(self) -> float:
        return sum(s for _, s in self.ops)

    def breakdown(self) -> dict[str, float]:
        """Seconds per operator name (repeated names summed), in first-seen order."""
        out: dict[str, float] = {}
        for op, s in self.ops:
            out[op] = out.get(op, 0.0) + s
        return out

    def table(self) -> str:
        total = self.total_s or 1.0
        rows = [f"{op:<28} {s * 1e6:10.1f} us {100 * s / total:5.1f}%" for op, s in self.breakdown().items()]
        return "\n".join([f"{self.name}: {self.total_s * 1e6:.1f} us (modeled)"] + rows)


def expert_mlp_phase(cfg: ModelConfig, tokens_per_expert: Sequence[int], dtype: str = "int8", *,
                     die: DieSpec = ASCEND_910C_DIE, eff: DieEfficiency = PAPER_EFFICIENCY) -> PhaseCost:
    """A die's routed experts (SwiGLU): grouped gate+up GEMM, SwiGLU on the vector cores, grouped down."""
    ffn, tokens = cfg.moe_intermediate_size, sum(tokens_per_expert)
    swiglu_bytes = OUT_BYTES * tokens * 3 * ffn  # read gate and up, write their product
    return (PhaseCost("experts")
            .add("gate_up", grouped_gemm_s(tokens_per_expert, cfg.hidden_size, 2 * ffn, dtype, die=die, eff=eff))
            .add("swiglu", vector_s(swiglu_bytes, die=die, eff=eff))
            .add("down", grouped_gemm_s(tokens_per_expert, ffn, cfg.hidden_size, dtype, die=die, eff=eff)))
