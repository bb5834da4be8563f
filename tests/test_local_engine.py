"""The instance scheduler over the real model in-process (LocalDriver): concurrent requests,
chunked prefill and preemption in a small pool give the local engine's tokens exactly."""
from __future__ import annotations

import asyncio

import torch

from cloudmatrix.checkpoints import load_model
from cloudmatrix.instance.local_driver import LocalDriver
from cloudmatrix.instance.loop import LoopSettings, StepLoop
from cloudmatrix.instance.request import Request
from cloudmatrix.instance.scheduler import SchedulerLimits
from cloudmatrix.model.generate import generate
from cloudmatrix.sampling_params import SamplingParams, StopRule


def test_continuous_batching_with_preemption_equals_the_local_engine(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(10, 40, (6,), generator=gen)
    prompts = [torch.randint(3, 1024, (int(n),), generator=gen).tolist() for n in lengths]
    new = 12
    expected = [list(generate(model, p, SamplingParams(max_tokens=new), ignore_eos=True)) for p in prompts]

    async def scenario():
        driver = LocalDriver(model, num_blocks=8, block_size=8)  # 64 token slots for 6 requests of up to 51
        loop = StepLoop(driver, driver.load, SchedulerLimits(max_running=6, max_step_tokens=40),
                        LoopSettings("local", probe_interval_s=3600.0))
        await loop.start()
        requests = [Request(f"r{i}", list(p), SamplingParams(max_tokens=new), StopRule(new, ignore_eos=True),
                            chunk_tokens=16) for i, p in enumerate(prompts)]
        streams = [loop.submit(r) for r in requests]

        async def tokens(events):
            return [t async for e in events for t in e.token_ids]

        out = await asyncio.gather(*(tokens(events) for events in streams))
        preemptions = loop.scheduler.preemptions
        await loop.stop()
        return out, preemptions

    out, preemptions = asyncio.run(scenario())
    assert out == expected
    assert preemptions > 0
