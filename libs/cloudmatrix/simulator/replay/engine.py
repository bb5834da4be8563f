"""The virtual-time engine: arrivals, the gateway's pick of the least-loaded instance, prefill
on the serving system's scheduler, the KV write-back to the context-cache pool and the handoff
to a decode instance, decode steps, and every token's time. Events are processed in simulated
seconds; nothing sleeps and no model runs (docs/simulator.md, "Request-level simulation")."""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable

from cloudmatrix.costmodel import ub
from cloudmatrix.costmodel.ops import DEEPSEEK_V3
from cloudmatrix.errors import ResourceExhausted
from cloudmatrix.instance.request import KvPrefix, Request, StepEvent
from cloudmatrix.instance.scheduler import SchedulerLimits
from cloudmatrix.model.config import ModelConfig
from cloudmatrix.sampling_params import SamplingParams, StopRule
from cloudmatrix.simulator.calibration import FITTED, Calibration
from cloudmatrix.simulator.replay.costs import GpuStepCosts, StepCosts
from cloudmatrix.simulator.replay.instance import TOKEN, SimInstance, prefix_kv
from cloudmatrix.simulator.replay.workload import MOONCAKE_BLOCK_TOKENS, TraceRequest


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """The latent KV of one token in BF16, every layer (70,272 bytes for DeepSeek-R1)."""
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2


@dataclasses.dataclass(frozen=True)
class Deployment:
    """The paper's deployment by default (PAPERS.md s2): 6 prefill instances of 32 dies, one
    decode instance of 320, INT8, MTP; the KV room per die and the pool's size are assumptions."""

    prefill_instances: int = 6
    prefill_dies: int = 32
    decode_instances: int = 1
    decode_dies: int = 320
    mtp: bool = True
    acceptance: float = 0.7
    int8: bool = True
    microbatches: int = 0              # decode: 0 = the faster of one and two per step
    block_tokens: int = 128            # the dies' KV block
    kv_gib_per_die: float = 32.0       # HBM left for KV after weights and activations (assumption)
    pool_gib: float = 8192.0           # the EMS pool's room for context-cache blocks (assumption)
    context_cache: bool = True
    decode_batch_per_die: int = 64     # most sequences a decode die runs at once
    prefill_tokens_per_die: int = 8192  # most tokens a prefill die computes per step (16,384 per NPU)
    hardware: str = "cloudmatrix384"   # or h800 / h100: a "die" is then a GPU (simulator/gpu.py)

    def __post_init__(self) -> None:
        for name in ("prefill_instances", "prefill_dies", "decode_instances", "decode_dies", "block_tokens",
                     "decode_batch_per_die", "prefill_tokens_per_die"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_dies < 2 or self.decode_dies < 2:
            raise ValueError("prefill_dies and decode_dies: an instance needs at least 2 dies (EP over them)")
        if self.hardware not in ("cloudmatrix384", "h800", "h100"):
            raise ValueError(f"hardware must be cloudmatrix384, h800 or h100, got {self.hardware!r}")
        if not 0.0 <= self.acceptance <= 1.0 or self.kv_gib_per_die <= 0 or self.pool_gib < 0:
            raise ValueError("acceptance must be in [0, 1], kv_gib_per_die > 0 and pool_gib >= 0")

    @property
    def npus(self) -> float:
        """NPUs (two dies each), or GPUs on Hopper hardware."""
        dies = self.prefill_instances * self.prefill_dies + self.decode_instances * self.decode_dies
        return dies / (2 if self.hardware == "cloudmatrix384" else 1)

    def blocks_per_die(self, kv_bytes: int) -> int:
        """KV blocks a die holds, at ``kv_bytes`` per token."""
        return int(self.kv_gib_per_die * 2**30 // (self.block_tokens * kv_bytes))


@dataclasses.dataclass
class Track:
    """One request's times (simulated seconds)."""

    arrival: float
    prompt: int
    output: int
    cached: int = 0
    first_step: float | None = None
    first_token: float | None = None
    tokens: int = 0
    last_token: float | None = None
    gaps: list[float] = dataclasses.field(default_factory=list)   # inter-token gaps after the first
    done: float | None = None
    failed: str | None = None


class ContextPool:
    """The context-cache pool over the trace's block ids: least recently used first, a capacity
    in bytes (each id stands for one block of the trace, ``block_tokens`` tokens of latent KV)."""

    def __init__(self, capacity_bytes: float, kv_bytes: int, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
        self.capacity = int(capacity_bytes // (block_tokens * kv_bytes))
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def cached_tokens(self, request: TraceRequest) -> int:
        """Tokens of the longest prefix held, leaving at least one token to compute."""
        hit = 0
        for block in request.blocks:
            if block not in self.blocks:
                break
            self.blocks.move_to_end(block)
            hit += 1
        size = request.block_tokens
        return min(hit * size, (request.prompt - 1) // size * size)

    def write(self, request: TraceRequest) -> None:
        for block in request.blocks:
            self.blocks[block] = None
            self.blocks.move_to_end(block)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


@dataclasses.dataclass(frozen=True)
class RoleShape:
    """One role's scheduler settings, as its service would run them."""

    limits: SchedulerLimits
    chunk_tokens: int                # a request's tokens per step
    blocks_per_die: int
    batch_wait_s: float = 0.0        # an idle instance waits while a burst keeps arriving (the step loop's rule)


def default_shapes(d: Deployment, kv_bytes: int) -> dict[str, RoleShape]:
    """The deployment's: prefill packs up to ``prefill_tokens_per_die`` per die per step (on
    CloudMatrix384 a prompt's tokens spread over the dies (SP), so a prompt runs in one step when
    it fits the instance; on GPUs a prompt stays on its GPU, in chunks of that many tokens); decode
    runs up to ``decode_batch_per_die`` sequences per die."""
    prefill_step = d.prefill_tokens_per_die * d.prefill_dies
    chunk = prefill_step if d.hardware == "cloudmatrix384" else d.prefill_tokens_per_die
    return {"prefill": RoleShape(SchedulerLimits(max_running=256, max_waiting=1 << 20, max_step_tokens=prefill_step),
                                 chunk, d.blocks_per_die(kv_bytes)),
            "decode": RoleShape(SchedulerLimits(max_running=d.decode_batch_per_die * d.decode_dies, max_waiting=1 << 20,
                                                max_step_tokens=2 * d.decode_batch_per_die * d.decode_dies,
                                                speculative_tokens=1 if d.mtp else 0),
                                2**31, d.blocks_per_die(kv_bytes))}


class Replay:
    def __init__(self, requests: list[TraceRequest], deployment: Deployment = Deployment(),
                 cal: Calibration = FITTED, closed_loop: int = 0, seed: int = 0, prefill_only: bool = False,
                 cfg: ModelConfig = DEEPSEEK_V3, shapes: dict[str, RoleShape] | None = None,
                 costs: dict | None = None) -> None:
        """``closed_loop`` N: the requests are sent N at a time, each next one when one finishes
        (their arrival times are ignored). ``prefill_only``: a request ends at its first token
        (what the time to first token depends on, much faster to replay). ``cfg``: the simulated
        model's dimensions (DeepSeek-R1 by default). ``shapes`` and ``costs`` (by role) replace
        the deployment's scheduler settings and the cost model's step prices (an emulator's own
        settings and a profile measured on this host: replay/emulator.py)."""
        self.requests, self.d, self.closed_loop, self.prefill_only = requests, deployment, closed_loop, prefill_only
        common = {"eff": cal.efficiency(), "int8": deployment.int8, "acceptance": deployment.acceptance,
                  "imbalance": cal.eplb_residual, "cfg": cfg}
        self.kv_bytes = kv_bytes_per_token(cfg)
        d = deployment
        self.shapes = default_shapes(d, self.kv_bytes) | (shapes or {})
        if d.hardware == "cloudmatrix384":
            priced = {"prefill": StepCosts("prefill", d.prefill_dies, **common),
                      "decode": StepCosts("decode", d.decode_dies, microbatches=d.microbatches,
                                          round_slowdown=cal.round_slowdown, **common)}
        else:
            gpu = {"hardware": d.hardware, "acceptance": d.acceptance, "imbalance": cal.eplb_residual, "cfg": cfg}
            priced = {"prefill": GpuStepCosts("prefill", d.prefill_dies, **gpu),
                      "decode": GpuStepCosts("decode", d.decode_dies, **gpu)}
        costs = priced | (costs or {})
        self.prefills = [self._instance(f"prefill-{i}", costs["prefill"], self.shapes["prefill"], seed + i)
                         for i in range(d.prefill_instances)]
        self.decodes = [self._instance(f"decode-{i}", costs["decode"], self.shapes["decode"], seed + 100 + i)
                        for i in range(d.decode_instances)]
        block = requests[0].block_tokens if requests else MOONCAKE_BLOCK_TOKENS
        self.pool = ContextPool(d.pool_gib * 2**30 if d.context_cache else 0, self.kv_bytes, block)
        self.context_limit = cfg.max_position_embeddings
        self.tracks: dict[str, Track] = {}
        self.trace_of: dict[str, TraceRequest] = {}
        self.events: list = []
        self._seq = itertools.count()
        self.now = 0.0
        self.kv_usage: list[tuple[float, float]] = []   # (time, decode blocks in use / all), per decode step
        self._next = 0

    def _instance(self, name: str, costs, shape: RoleShape, seed: int) -> SimInstance:
        return SimInstance(name, costs, shape.blocks_per_die, self.d.block_tokens, shape.limits, seed)

    def run(self, on_progress: Callable[[float], None] | None = None) -> Replay:
        for _ in range(self.closed_loop or len(self.requests)):
            self._arrive_next(None)
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            getattr(self, f"_on_{kind}")(payload)
            if on_progress is not None:
                on_progress(self.now)
        return self

    def _at(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self.events, (t, next(self._seq), kind, payload))

    def _arrive_next(self, at: float | None) -> None:
        if self._next >= len(self.requests):
            return
        trace = self.requests[self._next]
        self._next += 1
        self._at(trace.arrival_s if at is None else at, "arrival", trace)

    # prefill

    def _on_arrival(self, trace: TraceRequest) -> None:
        rid = f"r{len(self.tracks)}"
        self.tracks[rid] = track = Track(self.now, trace.prompt, trace.output)
        self.trace_of[rid] = trace
        if trace.prompt + trace.output > self.context_limit:  # the gateway answers 400
            track.failed = f"{trace.prompt} + {trace.output} tokens do not fit the context of {self.context_limit}"
            self._arrive_after_finish()
            return
        instance = min(self.prefills, key=lambda i: i.load)  # the gateway's pick: least loaded, first listed
        track.cached = self.pool.cached_tokens(trace) if self.d.context_cache else 0
        request = Request(rid, [TOKEN] * trace.prompt, _SAMPLING, StopRule(max_new_tokens=1),
                          prefix=KvPrefix(track.cached, _no_fetch) if track.cached else None,
                          chunk_tokens=self.shapes["prefill"].chunk_tokens)
        self._add(instance, request)

    def _add(self, instance: SimInstance, request: Request) -> None:
        try:
            instance.scheduler.add(request)
        except (ValueError, ResourceExhausted) as err:  # never fits a die, or the queue is full: the
            self.tracks[request.request_id].failed = str(err)  # service answers INVALID_ARGUMENT / RESOURCE_EXHAUSTED
            self._arrive_after_finish()
            return
        self._try_start(instance)

    def _try_start(self, instance: SimInstance) -> None:
        if instance.plan is not None or instance.gather is not None:
            return
        wait = self.shapes["prefill" if instance in self.prefills else "decode"].batch_wait_s
        scheduler = instance.scheduler
        if wait and scheduler.waiting and not scheduler.running and not instance.gathered:
            instance.gather = (len(scheduler.waiting), 1)  # as StepLoop._gather_burst: gaps under the wait, at most 10
            self._at(self.now + wait, "gathered", instance)
            return
        instance.gathered = False
        started = instance.start_step(self.now)
        if started is None:
            return
        plan, seconds = started
        for request in plan.fetches:  # the cached prefix (prefill) or the prompt (decode) from the pool over UB
            seconds_to_fetch = ub.pool_transfer_s(request.prefix_tokens * self.kv_bytes)
            self._at(self.now + seconds_to_fetch, "fetched", (instance, request, request.admissions))
        for chunk in plan.chunks:
            track = self.tracks[chunk.request.request_id]
            if track.first_step is None:
                track.first_step = self.now
        if not plan.empty:
            self._at(self.now + seconds, "step", instance)

    def _on_gathered(self, instance: SimInstance) -> None:
        waiting, gaps = instance.gather
        if len(instance.scheduler.waiting) != waiting and gaps < 10:
            instance.gather = (len(instance.scheduler.waiting), gaps + 1)
            self._at(self.now + self.shapes["prefill" if instance in self.prefills else "decode"].batch_wait_s,
                     "gathered", instance)
            return
        instance.gather, instance.gathered = None, True
        self._try_start(instance)

    def _on_fetched(self, payload) -> None:
        instance, request, admission = payload
        instance.scheduler.prefix_arrived(request, admission, prefix_kv(request.prefix_tokens, self.d.block_tokens))
        self._try_start(instance)

    def _on_step(self, instance: SimInstance) -> None:
        delivered = instance.finish_step(self.now)
        if instance in self.decodes:
            self.kv_usage.append((self.now, instance.scheduler.blocks.usage))
        for request, item in delivered:
            self._delivered(instance, request, item)
        self._try_start(instance)

    def _delivered(self, instance: SimInstance, request: Request, item: StepEvent | Exception) -> None:
        track = self.tracks[request.request_id]
        if isinstance(item, Exception):
            track.failed = str(item)
            self._arrive_after_finish()
            return
        if instance in self.prefills:
            if item.finish_reason is not None:  # earlier chunks of a long prompt give no token
                self._prefilled(request.request_id, track)
            return
        if item.token_ids:
            gap = self.now - track.last_token
            track.gaps.extend([gap / len(item.token_ids)] * len(item.token_ids))
            track.tokens += len(item.token_ids)
            track.last_token = self.now
        if item.finish_reason is not None:
            track.done = self.now
            self._arrive_after_finish()

    def _prefilled(self, rid: str, track: Track) -> None:
        """The first token: shown now; the prompt's KV written to the pool, then handed to a decode."""
        track.first_token = track.last_token = self.now
        track.tokens = 1
        trace = self.trace_of[rid]
        if self.d.context_cache:
            self.pool.write(trace)
        if trace.output <= 1 or self.prefill_only:
            track.done = self.now
            self._arrive_after_finish()
            return
        written = ub.pool_transfer_s((trace.prompt - track.cached) * self.kv_bytes)
        self._at(self.now + written, "handoff", rid)

    # decode

    def _on_handoff(self, rid: str) -> None:
        track = self.tracks[rid]
        instance = min(self.decodes, key=lambda i: i.load)
        request = Request(rid, [TOKEN] * (track.prompt + 1), _SAMPLING, StopRule(max_new_tokens=track.output),
                          prefix=KvPrefix(track.prompt, _no_fetch), new_tokens=1, draft=TOKEN if self.d.mtp else None,
                          chunk_tokens=self.shapes["decode"].chunk_tokens)
        self._add(instance, request)

    def _arrive_after_finish(self) -> None:
        if self.closed_loop:
            self._arrive_next(self.now)


_SAMPLING = SamplingParams(max_tokens=1 << 20, ignore_eos=True)


async def _no_fetch():  # the engine delivers prefixes itself (``_on_fetched``)
    raise AssertionError("the replay engine fetches prefixes itself")


def span_s(replay: Replay) -> float:
    """Simulated seconds from the first arrival to the last finish."""
    done = [t.done for t in replay.tracks.values() if t.done is not None]
    return max(done, default=0.0) - min((t.arrival for t in replay.tracks.values()), default=0.0) or math.nan
