"""A decode pool sized for 4 concurrent requests serves 16 concurrent requests to completion with
the local engine's tokens: the scheduler admits by KV blocks and preempts (recomputing later)
when the running requests outgrow the pool, and says so in its metrics."""
from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch

from cloudmatrix.checkpoints import load_model
from cloudmatrix.model.generate import generate
from cloudmatrix.sampling_params import SamplingParams
from cmx.decode.v1 import decode_pb2_grpc
from cmx.prefill.v1 import prefill_pb2_grpc
from tests.metrics_text import samples, scrape, value
from tests.services import running_services
from tests.test_decode import _generate, _wait_until_idle

pytestmark = pytest.mark.timeout(400)
BLOCKS_PER_DIE = 8   # 2 dies x 8 blocks of 16 tokens: 4 requests of up to 64 tokens


def test_a_pool_for_4_serves_16_concurrent_requests_with_preemption(tmp_path, tiny_checkpoint):
    gen = torch.Generator().manual_seed(416)
    # prompts of 2 blocks: 4 fit a die at once, and every one needs a third block as it grows, so
    # preemption happens whatever order the requests arrive in
    lengths = torch.randint(20, 33, (16,), generator=gen)
    prompts = [torch.randint(3, 1024, (int(n),), generator=gen).tolist() for n in lengths]
    local = load_model(tiny_checkpoint)
    expected = [list(generate(local, p, SamplingParams(max_tokens=20), ignore_eos=True)) for p in prompts]
    base = [("kv0", "kvcache", ()), ("fabric", "ub_fabric", ())] + [(d, "npu_emulator", ()) for d in
                                                                     ("pdie0", "ddie0", "ddie1")]
    with running_services(tmp_path, base) as r:
        common = (f"checkpoint={tiny_checkpoint}", "block_size=16", f"kvcache={r['kv0'].address}")
        instances = [("prefill", "prefill", common + (f"dies={r['pdie0'].address}",)),
                     ("decode", "decode", common + (f"dies={r['ddie0'].address},{r['ddie1'].address}",
                                                    f"fabric={r['fabric'].address}",
                                                    f"kv_blocks_per_die={BLOCKS_PER_DIE}"))]
        with running_services(tmp_path, instances) as s:
            decode_addr = s["decode"].address

            async def run():
                async with grpc.aio.insecure_channel(s["prefill"].address) as pc, \
                        grpc.aio.insecure_channel(decode_addr) as dc:
                    prefill, decode = prefill_pb2_grpc.PrefillStub(pc), decode_pb2_grpc.DecodeStub(dc)
                    return await asyncio.gather(*(_generate(prefill, decode, f"cap{i}", p, 20, ignore_eos=True)
                                                  for i, p in enumerate(prompts)))

            results = asyncio.run(run())
            load = _wait_until_idle(decode_addr)
            metrics = scrape(s['decode'].metrics_port)
            dies = [scrape(r[d].metrics_port) for d in ("ddie0", "ddie1")]
    assert [tokens for tokens, _ in results] == expected
    assert load.kv_blocks_total == 2 * BLOCKS_PER_DIE and list(load.die_kv_blocks_free) == [BLOCKS_PER_DIE] * 2
    counted = value(metrics, "cmx_num_preemptions_total", engine="decode-0")
    assert load.preemptions > 0 and counted == load.preemptions
    phase = {labels["phase"]: v for labels, v in samples(metrics, "cmx_engine_die_phase_seconds_total",
                                                           engine="decode-0")}
    assert set(phase) == {"forward", "compute", "dispatch", "combine", "sample"}
    assert phase["forward"] == pytest.approx(sum(phase[k] for k in ("compute", "dispatch", "combine", "sample")))
    assert phase["compute"] > 0 and phase["dispatch"] > 0  # 2 dies: the MoE rounds wait on the fabric
    model = Path(tiny_checkpoint).resolve().name
    steps = value(metrics, "cmx_engine_step_seconds_count", engine="decode-0")
    for die, text in enumerate(dies):  # each die: its Forwards (one per step) and its experts' load
        labels = {"model_name": model, "die": str(die)}
        assert value(text, "cmx_die_forwards_total", **labels) == steps
        assert value(text, "cmx_die_forward_seconds_total", phase="total", **labels) > 0
        experts = samples(text, "cmx_expert_tokens_total", **labels)
        assert experts and value(text, "cmx_expert_tokens_total", **labels) > 0
    local_experts = [{(lb["layer"], lb["expert"]) for lb, _ in samples(t, "cmx_expert_tokens_total")} for t in dies]
    assert not local_experts[0] & local_experts[1]  # each routed expert lives on one die (no redundancy here)
