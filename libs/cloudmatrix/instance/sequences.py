"""Sequences stepped by hand on a loaded instance, for tools and tests (``cmx generate
--instance``, the instance tests): every call is one step of the listed sequences. The serving
services never use this; their Scheduler owns requests and blocks (scheduler.py)."""
from __future__ import annotations

import dataclasses

from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.driver import InstanceDriver
from cloudmatrix.rpc.sampling import sampling_to_proto
from cloudmatrix.sampling_params import SamplingParams
from cmx.npu.v1 import npu_pb2


@dataclasses.dataclass(frozen=True)
class StepInput:
    seq_id: str
    token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    skip_sampling: bool = False


@dataclasses.dataclass
class _Sequence:
    die: int
    blocks: list[int]
    cached: int = 0


class SequenceTable:
    def __init__(self, driver: InstanceDriver, blocks: BlockManager) -> None:
        self.driver, self.blocks = driver, blocks
        self.sequences: dict[str, _Sequence] = {}

    async def step(self, inputs: list[StepInput], return_logits: bool = False) -> dict[str, npu_pb2.SequenceOutput]:
        """One step: new tokens for some sequences (new ids start new sequences on the die with
        the most free blocks)."""
        per_die: list[list[npu_pb2.SequenceInput]] = [[] for _ in self.driver.dies]
        for item in inputs:
            seq = self.sequences.get(item.seq_id) or self._start(item.seq_id)
            needed = self.blocks.blocks_for(seq.cached + len(item.token_ids)) - len(seq.blocks)
            if not self.blocks.can_allocate(seq.die, needed):
                raise ValueError(f"{item.seq_id}: die {seq.die} has {self.blocks.num_free(seq.die)} free blocks, "
                                 f"{needed} needed")
            seq.blocks += self.blocks.allocate(seq.die, needed)
            per_die[seq.die].append(npu_pb2.SequenceInput(
                seq_id=item.seq_id, token_ids=item.token_ids, start_position=seq.cached, block_table=seq.blocks,
                sampling=sampling_to_proto(item.sampling), skip_sampling=item.skip_sampling))
        result = await self.driver.forward(per_die, return_logits=return_logits)
        for item in inputs:
            self.sequences[item.seq_id].cached += len(item.token_ids)
        return result.outputs

    def _start(self, seq_id: str) -> _Sequence:
        die = max(range(self.blocks.num_dies), key=self.blocks.num_free)
        seq = self.sequences[seq_id] = _Sequence(die, [])
        return seq

    def release(self, seq_id: str) -> None:
        seq = self.sequences.pop(seq_id)
        self.blocks.free(seq.die, seq.blocks)
