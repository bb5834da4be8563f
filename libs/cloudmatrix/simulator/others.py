"""The second published system, held out completely: DeepSeek's H800 profile deployment and
SGLang's 96-H100 deployment (figures as the CloudMatrix paper cites them, PAPERS.md; sources in
docs/simulator-sources.md), predicted by simulator/gpu.py with the H800's public operator figures.
No constant is tuned to these rows; the EPLB residual is the router's (calibrated on Ascend rows).
"""
from __future__ import annotations

from cloudmatrix.simulator.calibration import FITTED, Calibration
from cloudmatrix.simulator.gpu import GpuDecodeSetup, gpu_prefill_tokens_per_s, simulate_gpu_decode
from cloudmatrix.simulator.paper import Row
from cloudmatrix.simulator.prefill import PrefillSetup

# Prefill as both deploy it: EP32 on 4 nodes, 4K prompts, 16,384 tokens per GPU, two microbatches,
# 9 routed copies per GPU (256 + 32 redundant over 32) and the shared expert on each GPU's tokens.
GPU_PREFILL = PrefillSetup(prompt_len=4096, tokens_per_die=16384, dies=32, experts_per_die=9, attention_tp=1)


def second_system_rows(cal: Calibration = FITTED) -> list[Row]:
    # DeepSeek's profile-data decode: EP128, 4K prompts, 128 requests per GPU, two microbatches;
    # no MTP named (assumption: off). SGLang: EP72 on 9 nodes, 4K inputs, 128 sequences per GPU,
    # with simulated MTP (acceptance: the paper's 0.7, an assumption); 288 / 72 = 4 copies per GPU.
    deepseek = simulate_gpu_decode(GpuDecodeSetup(batch=128, kv_len=4096, ep=128, experts_per_gpu=2,
                                                  imbalance=cal.eplb_residual), "h800")
    sglang = simulate_gpu_decode(GpuDecodeSetup(batch=128, kv_len=4096, ep=72, experts_per_gpu=4, mtp=True,
                                                imbalance=cal.eplb_residual), "h100")
    rows = [Row("h800_decode", "h800", "DeepSeek profile, decode EP128, batch 128, 4K", "TPOT ms", 50.2,
                deepseek.tpot_s * 1e3, {"paper_tokens_per_s_per_gpu": 2325,
                                        "tokens_per_s_per_gpu": deepseek.tokens_per_s_per_gpu}),
            Row("h800_prefill", "h800", "DeepSeek profile, prefill EP32, 4K, 16K tokens/GPU", "tokens/s per GPU",
                7839, gpu_prefill_tokens_per_s(GPU_PREFILL, "h800")),
            Row("h100_decode", "h100", "SGLang 96 H100, decode EP72, batch 128, 4K, MTP", "TPOT ms", 55.6,
                sglang.tpot_s * 1e3, {"paper_tokens_per_s_per_gpu": 2172,
                                      "tokens_per_s_per_gpu": sglang.tokens_per_s_per_gpu})]
    for eplb, paper in (("default", 6288), ("perfect", 7417)):
        setup = PrefillSetup(**{**GPU_PREFILL.__dict__, "imbalance": cal.eplb_residual if eplb == "default" else 1.0})
        rows.append(Row(f"h100_prefill_{eplb}", "h100", f"SGLang 96 H100, prefill EP32, {eplb} EPLB",
                        "tokens/s per GPU", paper, gpu_prefill_tokens_per_s(setup, "h100")))
    return rows
