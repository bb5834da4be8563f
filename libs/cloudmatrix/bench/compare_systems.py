"""The three kinds of system `cmx bench compare` measures, each as one function: the same
prompts in, {output_tok_s, ttft/tpot percentiles} out. Every request is sent at t = 0; TTFT is
from then to the request's first token, TPOT the mean gap between its later tokens."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch

from cloudmatrix.bench.cpu import TopologyProcesses, cpu_split
from cloudmatrix.bench.serve.runner import LoadShape, run_load
from cloudmatrix.bench.serve.stats import percentile, speculation, step_breakdown, step_snapshot
from cloudmatrix.bench.serve.workload import BenchRequest
from cloudmatrix.demo import gateway_url, get_json
from cloudmatrix.instance.local_driver import LocalDriver
from cloudmatrix.instance.loop import LoopSettings, StepLoop
from cloudmatrix.instance.request import Request, StepEvent
from cloudmatrix.instance.scheduler import SchedulerLimits
from cloudmatrix.model.transformer import DeepseekV3
from cloudmatrix.sampling_params import SamplingParams, StopRule


def _summary(ttft: list[float], tpot: list[float], output_tokens: int, elapsed: float, cpu_s: float | None = None) -> dict:
    cpu = {} if cpu_s is None else {"cpu_s": cpu_s, "cpu_s_per_token": cpu_s / max(output_tokens, 1)}
    return {**cpu, "output_tokens": output_tokens, "elapsed_s": elapsed, "output_tok_s": output_tokens / elapsed,
            "ttft_p50_ms": percentile(ttft, 50) * 1e3,
            "ttft_p99_ms": percentile(ttft, 99) * 1e3, "tpot_p50_ms": percentile(tpot, 50) * 1e3,
            "tpot_p99_ms": percentile(tpot, 99) * 1e3}


def hf_generate(checkpoint: Path, prompts: list[BenchRequest], batch: int, cpu_clock: Callable[[], float],
                warmup: list[BenchRequest] = ()) -> dict:
    """transformers' DeepseekV3ForCausalLM.generate, greedy, static batches of ``batch`` prompts
    (of one length: no padding), every output exactly output_len tokens; ``cpu_clock`` reads the
    CPU-seconds this process has spent. The ``warmup`` prompts go through first, untimed."""
    import transformers

    model = transformers.DeepseekV3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                               attn_implementation="eager")
    if warmup:
        _hf_batches(model, list(warmup), batch, time.perf_counter())
    start, cpu_start = time.perf_counter(), cpu_clock()
    ttft, tpot, generated = _hf_batches(model, prompts, batch, start)
    return _summary(ttft, tpot, generated, time.perf_counter() - start, cpu_clock() - cpu_start) \
        | {"warmup_requests": len(warmup)}


def _hf_batches(model, prompts: list[BenchRequest], batch: int, start: float) -> tuple[list, list, int]:
    """Generate for every prompt, ``batch`` at a time: (TTFT per prompt, TPOT per prompt, tokens)."""
    import transformers

    out_len, ttft, tpot, generated = prompts[0].output_len, [], [], 0

    class Clock(transformers.StoppingCriteria):  # called once per generated token
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        ids = torch.tensor([p.prompt for p in chunk])  # [B, S]
        clock = Clock()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len,
                           min_new_tokens=out_len, do_sample=False, stopping_criteria=[clock], pad_token_id=0)
        ttft += [clock.stamps[0] - start] * len(chunk)
        tpot += [(clock.stamps[-1] - clock.stamps[0]) / max(out_len - 1, 1)] * len(chunk)
        generated += len(clock.stamps) * len(chunk)  # one stamp per generated position of the batch
    return ttft, tpot, generated


async def in_process(model: DeepseekV3, prompts: list[BenchRequest], cpu_clock: Callable[[], float],
                     warmup: list[BenchRequest] = ()) -> dict:
    """The instance scheduler and step loop over the model in this process (continuous batching);
    a model with its MTP module speculates (one draft token per step). The ``warmup`` prompts go
    through first, untimed."""
    blocks = max(sum(-(-(len(p.prompt) + p.output_len + 1) // 16) for p in batch) for batch in (prompts, warmup)) + 8
    driver = LocalDriver(model, blocks)
    limits = SchedulerLimits(max_running=len(prompts), max_waiting=len(prompts), max_step_tokens=1024,
                             speculative_tokens=min(1, len(model.mtp)))
    loop = StepLoop(driver, driver.load, limits, LoopSettings("in-process", probe_interval_s=3600.0))
    await loop.start()
    if warmup:
        await asyncio.gather(*(_token_times(loop.submit(r)) for r in _requests(warmup, "w")))
    counts = loop.scheduler.speculation
    warm_drafts, warm_accepted = counts.drafts, counts.accepted
    start, cpu_start = time.perf_counter(), cpu_clock()
    stamps = await asyncio.gather(*(_token_times(loop.submit(r)) for r in _requests(prompts, "r")))
    elapsed, cpu_s = time.perf_counter() - start, cpu_clock() - cpu_start
    await loop.stop()
    summary = _summary([s[0] - start for s in stamps], [(s[-1] - s[0]) / max(len(s) - 1, 1) for s in stamps],
                       sum(len(s) for s in stamps), elapsed, cpu_s)
    drafts, accepted = counts.drafts - warm_drafts, counts.accepted - warm_accepted
    return summary | {"tokens_per_step": speculation(drafts, accepted)["mean_acceptance_length"],
                      "warmup_requests": len(warmup)}


def _requests(prompts: list[BenchRequest], prefix: str) -> list[Request]:
    return [Request(f"{prefix}{i}", list(p.prompt), SamplingParams(max_tokens=p.output_len),
                    StopRule(p.output_len, ignore_eos=True), chunk_tokens=256) for i, p in enumerate(prompts)]


async def _token_times(events: AsyncIterator[StepEvent]) -> list[float]:
    stamps = []
    async for event in events:
        stamps += [time.perf_counter()] * len(event.token_ids)
    return stamps


def suite(run_dir: Path, decode_metrics: str, prompts: list[BenchRequest], processes: TopologyProcesses) -> dict:
    """Every prompt at once through the gateway of a topology `cmx up` started in ``run_dir``;
    also the decode instance's mean sequences per step and the CPU each kind of process spent."""
    url = gateway_url(run_dir)
    model = get_json(f"{url}/v1/models")["data"][0]["id"]
    before, cpu_before = step_snapshot(decode_metrics), processes.snapshot()
    results, elapsed = asyncio.run(run_load(url, model, prompts, LoadShape(concurrency=len(prompts))))
    cpu_after, steps = processes.snapshot(), step_breakdown(before, step_snapshot(decode_metrics))
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed on the suite, e.g. {failed[0]}")
    output_tokens = sum(r.output_tokens for r in results)
    cpu = cpu_split(processes.kinds, cpu_before, cpu_after, output_tokens)
    summary = _summary([r.ttft_s for r in results], [r.tpot_s for r in results], output_tokens, elapsed, cpu["cpu_s"])
    tokens = steps.get("speculation", {}).get("mean_acceptance_length", 1.0)
    return {**summary, "decode_seqs_per_step": steps.get("sequences_per_step", 0.0), "tokens_per_step": tokens,
            "cpu": cpu, "requests": len(results)}
