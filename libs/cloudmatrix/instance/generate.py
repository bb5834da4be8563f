"""Generation on an expert-parallel instance without the serving services (``cmx generate
--instance``, the instance tests): the same step loop and scheduler the services run, over a
driver the caller loaded. Requests go through ``submit`` like any service's."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.loop import LoopSettings, StepLoop
from cloudmatrix.instance.request import Request, StepEvent
from cloudmatrix.instance.scheduler import SchedulerLimits
from cloudmatrix.instance.step import Driver
from cloudmatrix.sampling_params import SamplingParams, StopRule


@dataclasses.dataclass
class StepTimes:
    """Summed over a request's steps: wall seconds here, and modeled CloudMatrix384 seconds
    (slowest die)."""

    measured_s: float = 0.0
    modeled_s: float = 0.0
    steps: int = 0

    def add(self, event: StepEvent) -> None:
        self.measured_s += event.step_measured_s
        self.modeled_s += event.step_modeled_s
        self.steps += 1


@contextlib.asynccontextmanager
async def serving(driver: Driver, blocks: BlockManager, limits: SchedulerLimits = SchedulerLimits(),
                  name: str = "cli") -> AsyncIterator[StepLoop]:
    """A step loop over dies already loaded (``blocks``: what their load claimed), stopped on exit."""
    async def load() -> BlockManager:
        return blocks

    loop = StepLoop(driver, load, limits, LoopSettings(name))
    await loop.start()
    try:
        yield loop
    finally:
        await loop.stop()


async def generate_on_instance(loop: StepLoop, prompt: list[int], params: SamplingParams, eos: int,
                               times: StepTimes, request_id: str = "cli") -> AsyncIterator[int]:
    """Yield tokens until the params' StopRule ends the request (EOS is yielded)."""
    request = Request(request_id, list(prompt), params, StopRule.of(params, eos))
    async for event in loop.submit(request):
        times.add(event)
        for token in event.token_ids:
            yield token
