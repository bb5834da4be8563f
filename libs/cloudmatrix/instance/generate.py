"""Generation on an expert-parallel instance through the driver (for studying one instance
without the serving services): prefill the prompt, then one token per step."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator

from cloudmatrix.instance.sequences import SequenceTable, StepInput
from cloudmatrix.sampling_params import SamplingParams, StopRule


@dataclasses.dataclass
class StepTimes:
    """Summed over steps: wall seconds here, and modeled CloudMatrix384 seconds (slowest die)."""

    measured_s: float = 0.0
    modeled_s: float = 0.0
    steps: int = 0

    def add(self, replies) -> None:
        self.measured_s += max(r.timing.measured_s for r in replies)
        self.modeled_s += max(r.timing.modeled_s for r in replies)
        self.steps += 1


async def generate_on_instance(table: SequenceTable, prompt: list[int], params: SamplingParams, eos: int,
                               times: StepTimes, seq_id: str = "cli") -> AsyncIterator[int]:
    """Yield tokens until the params' StopRule ends the request (EOS is yielded); frees the
    sequence's blocks at the end."""
    rule, tokens = StopRule.of(params, eos), list(prompt)
    try:
        for new_tokens in itertools.count(1):
            out = (await table.step([StepInput(seq_id, tokens, params)]))[seq_id]
            times.add(table.driver.last_replies)
            yield out.token_id
            if rule.reason(out.token_id, new_tokens, len(prompt) + new_tokens) is not None:
                return
            tokens = [out.token_id]
    finally:
        table.release(seq_id)
