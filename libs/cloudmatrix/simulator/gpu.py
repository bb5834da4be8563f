"""DeepSeek-V3/R1 on Hopper GPUs, for the second-system check: the two other published
deployments predicted with the H800's public operator figures (simulator/hardware.py) and no
constant tuned to their rows (docs/simulator.md, "A second published system").

Decode on a GPU differs from the CloudMatrix384 layout: attention is data-parallel per GPU, every
GPU runs the shared expert on its own tokens and holds ``experts_per_gpu`` routed copies, and two
microbatches overlap one's compute with the other's dispatch and combine (DeepSeek's pipeline,
SGLang's two-batch overlap), which run on DeepEP's low-latency kernels. Prefill is the
CloudMatrix384 prefill model with attention data-parallel (TP 1) and DeepEP's normal kernels.
"""
from __future__ import annotations

import dataclasses

from cloudmatrix.costmodel.ops import DEEPSEEK_V3, PhaseCost, expert_mlp_phase, gemm_s, vector_s
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.simulator.decode import ACT_BYTES, attention_path, dense_mlp, partition
from cloudmatrix.simulator.experts import step_fluctuation
from cloudmatrix.simulator.hardware import (
    BF16_ROW_BYTES,
    DEEPEP_LOW_LATENCY,
    DEEPEP_NORMAL,
    FP8_ROW_BYTES,
    HARDWARE,
    Hardware,
)
from cloudmatrix.simulator.prefill import PrefillSetup, overlapped_s, simulate_prefill

GPUS_PER_NODE = 8
H800_SMS = 132      # SMs of an H800 / H100 SXM
COMM_SMS = 20       # SMs DeepSeek gives dispatch and combine (DeepSeek-V3 report, s3.2.2)


@dataclasses.dataclass(frozen=True)
class GpuDecodeSetup:
    batch: int = 128                 # sequences per GPU
    kv_len: int = 4096
    ep: int = 128                    # GPUs of the decode instance (attention DP = MoE EP)
    experts_per_gpu: int = 2         # routed copies per GPU: (256 + redundant) / EP
    mtp: bool = False
    acceptance: float = 0.7          # MTP draft acceptance (the paper's ~70%; no GPU figure)
    microbatches: int = 2
    imbalance: float = 1.0           # EPLB's residual (a step's fluctuation comes on top)

    def __post_init__(self) -> None:
        checks = {"batch": self.batch >= 1, "kv_len": self.kv_len >= 1, "ep": self.ep >= 2,
                  "experts_per_gpu": self.experts_per_gpu >= 1, "microbatches": self.microbatches in (1, 2),
                  "imbalance": self.imbalance >= 1.0, "acceptance": 0.0 <= self.acceptance <= 1.0}
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"{field}: out of range ({getattr(self, field)!r})")


@dataclasses.dataclass(frozen=True)
class GpuDecodeResult:
    setup: GpuDecodeSetup
    step_s: float
    layer_s: float
    compute: PhaseCost               # one MoE layer's compute, whole batch
    rounds: PhaseCost                # one MoE layer's dispatch and combine, whole batch

    @property
    def tpot_s(self) -> float:
        return self.step_s / (1.0 + (self.setup.acceptance if self.setup.mtp else 0.0))

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.setup.batch / self.tpot_s


def gpu_moe(cfg: ModelConfig, tokens: int, setup: GpuDecodeSetup, hw: Hardware) -> tuple[PhaseCost, PhaseCost]:
    """(compute, rounds) of one MoE layer for ``tokens`` tokens per GPU: gate, the shared expert on
    the GPU's own tokens, the busiest GPU's routed rows over its experts, the weighted sum; DeepEP
    low-latency dispatch (FP8) and combine (BF16) of the GPU's tokens."""
    die, eff, k = hw.die, hw.eff, cfg.num_experts_per_tok
    mean_rows = tokens * k                    # routed rows a GPU gets on average (as many as it sends)
    busiest = mean_rows * setup.imbalance * step_fluctuation(mean_rows, setup.ep)
    per_expert = [round(busiest / setup.experts_per_gpu)] * setup.experts_per_gpu
    shared_cfg = dataclasses.replace(cfg, moe_intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts)
    compute = (PhaseCost("moe")
               .add("gate", gemm_s(tokens, cfg.hidden_size, cfg.n_routed_experts, dtype="bf16", die=die, eff=eff))
               .extend(dataclasses.replace(expert_mlp_phase(shared_cfg, [tokens], "int8", die=die, eff=eff),
                                           name="shared"))
               .extend(expert_mlp_phase(cfg, per_expert, "int8", die=die, eff=eff))
               .add("weighted_sum", vector_s(ACT_BYTES * cfg.hidden_size * tokens * (k + 2), die=die, eff=eff)))
    rounds = (PhaseCost("rounds")
              .add("dispatch", DEEPEP_LOW_LATENCY.round_s("dispatch", tokens, setup.ep))
              .add("combine", DEEPEP_LOW_LATENCY.round_s("combine", tokens, setup.ep)))
    return compute, rounds


def _layer_s(cfg: ModelConfig, batch: int, q: int, setup: GpuDecodeSetup, hw: Hardware) -> tuple[float, ...]:
    attention = attention_path(cfg, batch, q, setup.kv_len, "int8", hw.die, hw.eff)
    moe, rounds = gpu_moe(cfg, batch * q, setup, hw)
    compute = attention.total_s + moe.total_s
    return overlapped_s(compute, rounds.total_s, setup.microbatches), attention.total_s


def simulate_gpu_decode(setup: GpuDecodeSetup, hardware: str = "h800", cfg: ModelConfig = DEEPSEEK_V3) -> GpuDecodeResult:
    hw = HARDWARE[hardware]
    b, q = setup.batch, 2 if setup.mtp else 1
    layer, attention_s = _layer_s(cfg, b, q, setup, hw)
    dense = cfg.first_k_dense_replace * (attention_s + dense_mlp(cfg, b * q, "int8", hw.die, hw.eff).total_s)
    head = gemm_s(b * q, cfg.hidden_size, cfg.vocab_size, dtype="bf16", die=hw.die, eff=hw.eff) \
        + vector_s(4 * b * q * cfg.vocab_size, die=hw.die, eff=hw.eff)
    step = (cfg.num_hidden_layers - cfg.first_k_dense_replace) * layer + dense + head
    if setup.mtp:  # the MTP module: its projection, one MoE layer over the drafts, its head
        step += (gemm_s(b, 2 * cfg.hidden_size, cfg.hidden_size, dtype="int8", die=hw.die, eff=hw.eff)
                 + _layer_s(cfg, b, 1, setup, hw)[0]
                 + gemm_s(b, cfg.hidden_size, cfg.vocab_size, dtype="bf16", die=hw.die, eff=hw.eff))
    compute, rounds = gpu_moe(cfg, b * q, setup, hw)
    return GpuDecodeResult(setup, step, layer, compute, rounds)


def remote_nodes_per_token(cfg: ModelConfig, ep: int) -> float:
    """Other nodes a token's experts are on, on average. DeepSeek-V3 routes each token to experts in
    at most ``topk_group`` of its ``n_group`` expert groups; with EP over ``ep / 8`` nodes a node
    holds ``n_group / nodes`` groups, and a node is reached when one of its groups is chosen
    (taken as uniform: balanced routing)."""
    from math import comb

    nodes = max(1, ep // GPUS_PER_NODE)
    if nodes == 1:
        return 0.0
    per_node = cfg.n_group // nodes if cfg.n_group >= nodes else 1
    missed = comb(cfg.n_group - per_node, cfg.topk_group) / comb(cfg.n_group, cfg.topk_group)
    return (nodes - 1) * (1.0 - missed)


def deepep_normal_rounds(kind: str, rows: float, ep: int, setup: PrefillSetup, cfg: ModelConfig) -> float:
    """Prefill's dispatch (FP8) or combine (BF16) over DeepEP's normal kernels: each token crosses
    RDMA once per other node its experts are on (DeepEP forwards it within the node over NVLink,
    and combine reduces it there before the RDMA hop), at the RDMA bottleneck bandwidth DeepEP
    reports; the NVLink part is taken as hidden under it."""
    size = FP8_ROW_BYTES if kind == "dispatch" else BF16_ROW_BYTES
    tokens = setup.sequences * setup.new_per_seq
    return DEEPEP_NORMAL.round_s(kind, tokens * remote_nodes_per_token(cfg, ep) * size, ep)


def gpu_prefill_tokens_per_s(setup: PrefillSetup, hardware: str = "h800") -> float:
    """Prompt tokens per second per GPU (``setup.tokens_per_die`` is per GPU; attention TP 1). The
    normal kernels run on SMs of their own while the other microbatch computes (DeepSeek-V3's
    report: 20 of the H800's 132 SMs suffice for IB and NVLink), so compute has the rest."""
    hw = HARDWARE[hardware]
    die = partition(hw.die, (H800_SMS - COMM_SMS) / H800_SMS) if setup.microbatches == 2 else hw.die
    result = simulate_prefill(dataclasses.replace(setup, attention_tp=1), die=die, eff=hw.eff,
                              rounds_s=deepep_normal_rounds)
    return setup.tokens_per_die / result.batch_s
