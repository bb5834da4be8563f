"""An instance = N dies sharing their experts over the fabric. The driver is the dies' client and
nothing more (the ``Driver`` of step.py, and the only module of the engine core that speaks
protobuf): it loads them (claiming every KV block of each die for the instance's scheduler),
runs one Forward per die per step (dies with nothing to do still take part in the MoE rounds),
writes and reads KV blocks, and probes the dies. Which block holds what is the scheduler's
business (scheduler.py), not the driver's.

A sequence's block table and sampling parameters go to its die once; later steps send only its
new tokens and new block ids (``cached``), and the plan's released sequences are named in the
next Forward (``finished_seq_ids``), as vLLM's scheduler output does.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

import grpc
import torch

from cloudmatrix.clients.npu import LoadedModel, NpuClient
from cloudmatrix.instance.blocks import BlockManager
from cloudmatrix.instance.step import ScheduledChunk, SequenceOutput, StepOutput
from cloudmatrix.moe.placement import ExpertPlacement
from cloudmatrix.rpc.client import ClientOptions
from cloudmatrix.rpc.sampling import logprobs_from_proto, sampling_to_proto
from cmx.npu.v1 import npu_pb2

log = logging.getLogger(__name__)


def die_phases(replies: list[npu_pb2.ForwardReply]) -> dict[str, float]:
    """Measured seconds per phase, mean over the dies: forward (a die's whole Forward),
    dispatch / combine (waiting for the fabric rounds), sample, and compute (the rest)."""
    sums: dict[str, float] = {}
    for reply in replies:
        phases = {p.phase: p.measured_s for p in reply.timing.phases}
        waits = {k: phases.get(k, 0.0) for k in ("dispatch", "combine", "sample")}
        parts = {"forward": reply.timing.measured_s, **waits,
                 "compute": max(0.0, reply.timing.measured_s - sum(waits.values()))}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / max(len(replies), 1) for k, v in sums.items()}


def _output(out: npu_pb2.SequenceOutput) -> SequenceOutput:
    tokens = ((out.token_id,) if out.has_token else ()) + ((out.bonus_token,) if out.HasField("bonus_token") else ())
    logprobs = tuple(logprobs_from_proto(lp) for field in ("sampled_logprobs", "bonus_logprobs")
                     if out.HasField(field) for lp in (getattr(out, field),))
    return SequenceOutput(tokens, logprobs, tuple(logprobs_from_proto(t) for t in out.prompt_logprobs),
                          out.draft_token if out.HasField("draft_token") else None)


DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})  # the die did not answer


@dataclasses.dataclass(frozen=True)
class DieProbe:
    die: int
    answered: bool
    loaded: bool                          # holds the model this driver loaded (False after a restart)
    code: grpc.StatusCode | None = None   # the failed probe's status code

    @property
    def healthy(self) -> bool:
        return self.answered and self.loaded

    def describe(self) -> str:
        code = self.code.name if self.code is not None else "no answer"
        return f"die {self.die} " + ("lost its model (restarted)" if self.answered else f"is down ({code})")


class InstanceDriver:
    def __init__(self, die_addresses: list[str], fabric_address: str = "", group: str = "instance",
                 timeout_s: float = 120.0) -> None:
        self.addresses, self.fabric_address, self.group = die_addresses, fabric_address, group
        self.timeout_s = timeout_s
        # No retries: a die that does not answer is the scheduler's business (die failure and recovery)
        self.dies = [NpuClient(a, ClientOptions(deadline_s=timeout_s, retries=0)) for a in die_addresses]
        self.step_no = 0
        # One step per microbatch at a time: concurrent steps of one microbatch could reach the
        # dies in different orders and wait on each other's rounds.
        self._step_locks = collections.defaultdict(asyncio.Lock)
        self.replies_by_microbatch: dict[int, list[npu_pb2.ForwardReply]] = {}
        self.model_id = ""
        self.loaded: list[LoadedModel] = []  # the dies' answers to the last load
        # die -> request id -> (the request's admission, blocks sent): a readmitted request goes in full
        self._sent: list[dict[str, tuple[int, int]]] = [{} for _ in self.dies]

    async def close(self) -> None:
        await asyncio.gather(*(d.close() for d in self.dies))

    async def load(self, checkpoint: str, precision: str = "fp32", placement: ExpertPlacement | None = None,
                   block_size: int = 16, pool_bytes: int = 0, dispatch_dtype: str = "",
                   model_cache: list[str] | None = None, cache_prefix: str = "", max_blocks: int = 0,
                   speculative_tokens: int = 0) -> BlockManager:
        """LoadModel on every die at once (each waits for the whole fabric group; with
        ``model_cache``, kvcache shard addresses, the dies read their weights from the pool;
        ``speculative_tokens`` 1: with the MTP module), then claim each die's KV blocks (at most
        ``max_blocks`` per die when > 0) for the instance."""
        replicas = placement.replicas if placement else None
        fabric = self.fabric_address if len(self.dies) > 1 else ""
        loaded = await asyncio.gather(*(d.load_model(
            checkpoint, precision=precision, die_id=i, num_dies=len(self.dies), placement=replicas,
            block_size=block_size, pool_bytes=pool_bytes, fabric_address=fabric, fabric_group=self.group,
            dispatch_dtype=dispatch_dtype, model_cache=model_cache, cache_prefix=cache_prefix,
            speculative_tokens=speculative_tokens)
            for i, d in enumerate(self.dies)))
        self.model_id, self.loaded = loaded[0].model_id, loaded
        self._sent = [{} for _ in self.dies]  # the reloaded dies hold no sequence
        counts = [min(r.kv_blocks_total, max_blocks) if max_blocks > 0 else r.kv_blocks_total for r in loaded]
        claimed = await asyncio.gather(*(d.allocate_blocks(n) for d, n in zip(self.dies, counts)))
        return BlockManager(claimed, block_size)

    async def forward(self, chunks: list[ScheduledChunk], released: list[tuple[int, str]] = (),
                      microbatch: int = 0) -> StepOutput:
        """One Forward per die for one microbatch: each die's chunks (maybe none) and the
        sequences it may forget. Steps of different microbatches may run at once (two-microbatch
        pipelining)."""
        finished = self._forget(released)
        per_die: list[list[npu_pb2.SequenceInput]] = [[] for _ in self.dies]
        for chunk in chunks:
            per_die[chunk.request.die].append(self._sequence_input(chunk))
        async with self._step_locks[microbatch]:
            self.step_no += 1
            calls = [d.forward(self.step_no, seqs, microbatch=microbatch, finished_seq_ids=done)
                     for d, seqs, done in zip(self.dies, per_die, finished)]
            results = await asyncio.gather(*calls, return_exceptions=True)
        try:
            _raise_for(results)
        except DieCallsFailed:  # what the dies hold is unknown now: send these in full next time
            self._forget([(c.request.die, c.request.request_id) for c in chunks])
            raise
        self.replies_by_microbatch[microbatch] = results
        return StepOutput({out.seq_id: _output(out) for reply in results for out in reply.outputs},
                          max((r.timing.modeled_s for r in results), default=0.0), die_phases(results))

    @property
    def last_replies(self) -> list[npu_pb2.ForwardReply]:
        """The dies' replies to the last step of microbatch 0."""
        return self.replies_by_microbatch[0]

    def _sequence_input(self, chunk: ScheduledChunk) -> npu_pb2.SequenceInput:
        request, sent = chunk.request, self._sent[chunk.request.die]
        admission, known = sent.get(request.request_id, (None, 0))
        sent[request.request_id] = (request.admissions, len(request.blocks))
        message = npu_pb2.SequenceInput(seq_id=request.request_id, token_ids=chunk.token_ids,
                                        start_position=chunk.start, skip_sampling=not chunk.sample,
                                        following_token=chunk.following, draft_token=chunk.draft)
        if admission != request.admissions:  # new to the die, or readmitted since: in full
            message.block_table.extend(request.blocks)
            message.sampling.CopyFrom(sampling_to_proto(request.sampling))
        else:
            message.cached = True
            message.block_table.extend(request.blocks[known:])
        return message

    def _forget(self, released) -> list[list[str]]:
        """Drop released sequences from what each die holds; per die, the ids to tell it."""
        finished: list[list[str]] = [[] for _ in self.dies]
        for die, request_id in released:
            if self._sent[die].pop(request_id, None) is not None:
                finished[die].append(request_id)
        return finished

    async def write_blocks(self, writes: dict[int, list[tuple[int, torch.Tensor]]]) -> None:
        """Fill blocks with KV: die -> [(block id, kv [layers, n, C+R])]; one WriteBlocks per die."""
        calls = {die: self.dies[die].write_blocks(blocks) for die, blocks in writes.items() if blocks}
        _raise_for(dict(zip(calls, await asyncio.gather(*calls.values(), return_exceptions=True))))

    async def read_blocks(self, die: int, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
        """KV of (block id, valid tokens) blocks on one die: [layers, n, C+R] each."""
        try:
            return await self.dies[die].read_blocks(blocks)
        except grpc.aio.AioRpcError as err:
            _raise_for({die: err})
            raise

    async def probe(self, timeout_s: float) -> list[DieProbe]:
        """GetDieInfo on every die: does it answer, and does it still hold this instance's model?"""
        replies = await asyncio.gather(*(d.die_info(timeout_s) for d in self.dies), return_exceptions=True)
        probes = []
        for die, reply in enumerate(replies):
            if isinstance(reply, grpc.aio.AioRpcError):
                probes.append(DieProbe(die, False, False, reply.code()))
            elif isinstance(reply, BaseException):
                raise reply
            else:
                probes.append(DieProbe(die, True, bool(self.model_id) and reply.model_id == self.model_id))
        return probes

    async def expert_load(self, reset: bool = False) -> torch.Tensor:
        """Tokens per expert summed over the dies: int64 [MoE layers, routed experts] (EPLB's input)."""
        return sum(load.token_counts for load in await asyncio.gather(*(d.expert_load(reset) for d in self.dies)))


def _raise_for(results) -> None:
    """When calls failed (results: a list by die, or a die -> result dict): StepFailed if a die
    did not answer (UNAVAILABLE, DEADLINE_EXCEEDED: it is down, or a peer's round never came),
    else StepError (the dies answered with an error: a bug, theirs or ours)."""
    items = results.items() if isinstance(results, dict) else enumerate(results)
    errors = [(die, r) for die, r in items if isinstance(r, BaseException)]
    if any(isinstance(e, grpc.aio.AioRpcError) and e.code() in DOWN_CODES for _, e in errors):
        raise StepFailed(errors)
    if errors:
        raise StepError(errors)


class DieCallsFailed(RuntimeError):
    """Calls failed on some dies: errors = [(die, exception)]. ``str()`` has the full details
    (for logs); ``summary`` names only the dies and status codes (for clients)."""

    def __init__(self, errors: list[tuple[int, BaseException]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"die {i}: {_code(e)}: {e.details() if isinstance(e, grpc.aio.AioRpcError) else e}"
                                   for i, e in errors))

    @property
    def summary(self) -> str:
        return ", ".join(f"die {i} failed ({_code(e)})" for i, e in self.errors)

    @property
    def codes(self) -> set:
        return {e.code() for _, e in self.errors if isinstance(e, grpc.aio.AioRpcError)}


class StepFailed(DieCallsFailed):
    """A die did not answer: the instance fails its requests and recovers (reloads the dies)."""


class StepError(DieCallsFailed):
    """Every die answered, some with an error (a bug): the step's requests fail, the dies stay."""


def _code(e: BaseException) -> str:
    return e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__
