"""Prefill + decode instances end to end: greedy output equals the local engine for concurrent
requests; cancelling or disconnecting frees the request's die blocks at once."""
from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
import torch

from cloudmatrix.model.checkpoint import load_model
from cloudmatrix.model.generate import generate
from cloudmatrix.model.sampling import SamplingParams
from cmx.common.v1 import common_pb2
from cmx.decode.v1 import decode_pb2, decode_pb2_grpc
from cmx.npu.v1 import npu_pb2, npu_pb2_grpc
from cmx.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from tests.services import running_services

pytestmark = pytest.mark.timeout(300)


@contextlib.contextmanager
def serving_processes(run_dir, checkpoint, pipelined: bool = False):
    """kvcache x2, fabric, prefill (2 dies), decode (2 dies); with ``pipelined`` also a second
    decode instance running two-microbatch pipelining on 2 more dies. Yields records by name."""
    base = [("kv0", "kvcache", ()), ("kv1", "kvcache", ()), ("fabric", "ub_fabric", ())]
    dies = ["pdie0", "pdie1", "ddie0", "ddie1"] + (["mdie0", "mdie1"] if pipelined else [])
    base += [(d, "npu_emulator", ()) for d in dies]
    with running_services(run_dir, base) as r:
        common = (f"checkpoint={checkpoint}", f"fabric={r['fabric'].address}", "block_size=16",
                  f"kvcache={r['kv0'].address},{r['kv1'].address}")
        instances = [("prefill", "prefill", common + (f"dies={r['pdie0'].address},{r['pdie1'].address}",)),
                     ("decode", "decode", common + (f"dies={r['ddie0'].address},{r['ddie1'].address}",))]
        if pipelined:
            instances.append(("decode2", "decode", common + (f"dies={r['mdie0'].address},{r['mdie1'].address}",
                                                             "microbatches=2", "instance_id=decode-mb2")))
        with running_services(run_dir, instances) as s:
            yield {**r, **s}


@contextlib.contextmanager
def serving_stack(run_dir, checkpoint):
    with serving_processes(run_dir, checkpoint) as p:
        yield p["prefill"].address, p["decode"].address, [p["ddie0"].address, p["ddie1"].address]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_checkpoint):
    with serving_stack(tmp_path_factory.mktemp("serving"), tiny_checkpoint) as addresses:
        yield addresses


async def _generate(prefill, decode, request_id, prompt, max_tokens, ignore_eos=False, stop_after=None):
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    first = await prefill.Prefill(prefill_pb2.PrefillRequest(request_id=request_id, token_ids=prompt,
                                                             sampling=sampling), timeout=120)
    tokens = [first.first_token]
    stream = decode.Decode(decode_pb2.DecodeRequest(request_id=request_id, prompt_token_ids=prompt,
                                                    first_token=first.first_token, kv=first.kv, sampling=sampling),
                           timeout=120)
    async for chunk in stream:
        tokens += list(chunk.token_ids)
        if stop_after is not None and len(tokens) >= stop_after:
            return tokens, stream
        if chunk.finished:
            return tokens, chunk.finish_reason
    return tokens, None


def test_concurrent_requests_equal_the_local_engine(stack, tiny_checkpoint):
    prefill_addr, decode_addr, _ = stack
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 1024, (int(n),), generator=gen).tolist()
               for n in torch.randint(5, 60, (8,), generator=gen)]
    lengths = [int(n) for n in torch.randint(1, 12, (8,), generator=gen)]
    local = load_model(tiny_checkpoint)
    expected = [list(generate(local, p, SamplingParams(max_tokens=m))) for p, m in zip(prompts, lengths)]

    async def run():
        async with grpc.aio.insecure_channel(prefill_addr) as pc, grpc.aio.insecure_channel(decode_addr) as dc:
            prefill, decode = prefill_pb2_grpc.PrefillStub(pc), decode_pb2_grpc.DecodeStub(dc)
            return await asyncio.gather(*(_generate(prefill, decode, f"c{i}", p, m)
                                          for i, (p, m) in enumerate(zip(prompts, lengths))))

    results = asyncio.run(run())
    assert [tokens for tokens, _ in results] == expected
    assert all(reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH) for _, reason in results)


def _free_blocks(dies: list[str]) -> int:
    total = 0
    for address in dies:
        with grpc.insecure_channel(address) as channel:
            total += npu_pb2_grpc.NpuEmulatorStub(channel).GetDieInfo(npu_pb2.GetDieInfoRequest(), timeout=10).kv_blocks_free
    return total


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_leaving_mid_stream_frees_the_blocks(stack, how):
    prefill_addr, decode_addr, dies = stack
    idle = _free_blocks(dies)

    async def run():
        async with grpc.aio.insecure_channel(prefill_addr) as pc, grpc.aio.insecure_channel(decode_addr) as dc:
            prefill, decode = prefill_pb2_grpc.PrefillStub(pc), decode_pb2_grpc.DecodeStub(dc)
            tokens, stream = await _generate(prefill, decode, f"leave-{how}", list(range(3, 70)), 400,
                                             ignore_eos=True, stop_after=4)
            busy = _free_blocks(dies)
            if how == "cancel":
                reply = await decode.Cancel(decode_pb2.CancelRequest(request_id=f"leave-{how}"), timeout=10)
                assert reply.cancelled
                async for chunk in stream:
                    if chunk.finished:
                        assert chunk.finish_reason == common_pb2.FINISH_REASON_CANCELLED
            else:
                stream.cancel()
            return busy

    busy = asyncio.run(run())
    assert busy < idle  # the request held blocks while running
    assert _wait_for(lambda: _free_blocks(dies) == idle)


def test_32_concurrent_requests_with_and_without_pipelining(tmp_path, tiny_checkpoint):
    gen = torch.Generator().manual_seed(32)
    prompts = [torch.randint(3, 1024, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 80, (32,), generator=gen)]
    lengths = [int(n) for n in torch.randint(1, 10, (32,), generator=gen)]
    local = load_model(tiny_checkpoint)
    expected = [list(generate(local, p, SamplingParams(max_tokens=m))) for p, m in zip(prompts, lengths)]

    async def run(prefill_addr, decode_addr, tag):
        async with grpc.aio.insecure_channel(prefill_addr) as pc, grpc.aio.insecure_channel(decode_addr) as dc:
            prefill, decode = prefill_pb2_grpc.PrefillStub(pc), decode_pb2_grpc.DecodeStub(dc)
            return await asyncio.gather(*(_generate(prefill, decode, f"{tag}{i}", p, m)
                                          for i, (p, m) in enumerate(zip(prompts, lengths))))

    with serving_processes(tmp_path, tiny_checkpoint, pipelined=True) as p:
        plain = asyncio.run(run(p["prefill"].address, p["decode"].address, "plain"))
        piped = asyncio.run(run(p["prefill"].address, p["decode2"].address, "piped"))
    assert [t for t, _ in plain] == expected
    assert [t for t, _ in piped] == [t for t, _ in plain]  # pipelining changes no token
