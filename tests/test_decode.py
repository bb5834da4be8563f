"""Prefill + decode instances end to end: greedy output equals the local engine for concurrent
requests; cancelling or disconnecting frees the request's die blocks at once."""
from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
import torch

from cloudmatrix.checkpoints import load_model
from cloudmatrix.kvcache import KvPoolClient, Lease
from cloudmatrix.model.generate import generate
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.sampling_params import SamplingParams
from cmx.common.v1 import common_pb2
from cmx.decode.v1 import decode_pb2, decode_pb2_grpc
from cmx.npu.v1 import npu_pb2, npu_pb2_grpc
from cmx.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from tests.services import running_services
from tests.waiting import wait_for

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


def _load(decode_addr: str) -> common_pb2.InstanceLoad:
    with grpc.insecure_channel(decode_addr) as channel:
        return decode_pb2_grpc.DecodeStub(channel).GetLoad(decode_pb2.GetLoadRequest(), timeout=10).load


_wait_for = wait_for  # (test_gateway and test_die_faults import it from here)


def _wait_until_idle(decode_addr: str, timeout_s: float = 60.0) -> common_pb2.InstanceLoad:
    """The instance's own answer once no request runs or waits (an explicit condition: every
    release has been applied by the scheduler), or the last answer at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = _load(decode_addr)
        if load.running_requests == load.waiting_requests == 0 or time.monotonic() > deadline:
            return load
        time.sleep(0.05)


def _die_blocks_free(dies: list[str]) -> list[int]:
    """What each die itself reports (the instance claimed its blocks at load: this never moves)."""
    free = []
    for address in dies:
        with grpc.insecure_channel(address) as channel:
            info = npu_pb2_grpc.NpuEmulatorStub(channel).GetDieInfo(npu_pb2.GetDieInfoRequest(), timeout=10)
            free.append(info.kv_blocks_free)
    return free


def test_requests_leaving_at_random_steps_free_their_blocks_and_the_rest_finish_exactly(stack, tiny_checkpoint):
    """8 requests share decode steps; 3 leave (2 cancels, 1 disconnect) at random steps. The other 5
    equal the local engine token for token, and every die's free blocks return to idle."""
    prefill_addr, decode_addr, dies = stack
    idle, idle_dies = _wait_until_idle(decode_addr), _die_blocks_free(dies)
    gen = torch.Generator().manual_seed(int(time.time()))
    lengths = torch.randint(20, 70, (8,), generator=gen)
    prompts = [torch.randint(3, 1024, (int(n),), generator=gen).tolist() for n in lengths]
    leave = {int(i): ("cancel" if k < 2 else "disconnect", int(torch.randint(2, 12, (1,), generator=gen)))
             for k, i in enumerate(torch.randperm(8, generator=gen)[:3])}
    local = load_model(tiny_checkpoint)
    expected = [list(generate(local, p, SamplingParams(max_tokens=24), ignore_eos=True)) for p in prompts]

    async def one(prefill, decode, i):
        how, after = leave.get(i, (None, None))
        tokens, stream = await _generate(prefill, decode, f"mix{i}", prompts[i], 24, ignore_eos=True,
                                         stop_after=after)
        if how == "cancel":
            assert (await decode.Cancel(decode_pb2.CancelRequest(request_id=f"mix{i}"), timeout=10)).cancelled
            async for chunk in stream:
                tokens += list(chunk.token_ids)
                if chunk.finished:
                    assert chunk.finish_reason == common_pb2.FINISH_REASON_CANCELLED
        elif how == "disconnect":
            stream.cancel()
        return tokens

    async def run():
        async with grpc.aio.insecure_channel(prefill_addr) as pc, grpc.aio.insecure_channel(decode_addr) as dc:
            prefill, decode = prefill_pb2_grpc.PrefillStub(pc), decode_pb2_grpc.DecodeStub(dc)
            return await asyncio.gather(*(one(prefill, decode, i) for i in range(8)))

    results = asyncio.run(run())
    for i, tokens in enumerate(results):
        if i in leave:
            assert tokens == expected[i][:len(tokens)]  # what it got before leaving was right
        else:
            assert tokens == expected[i]
    after = _wait_until_idle(decode_addr)
    assert list(after.die_kv_blocks_free) == list(idle.die_kv_blocks_free) and after.kv_blocks_used == 0
    assert _die_blocks_free(dies) == idle_dies


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


def test_the_prefill_leases_the_prompt_blocks_until_the_decode_has_read_them(stack):
    prefill_addr, decode_addr, _ = stack
    prompt = list(range(40, 90))
    sampling = common_pb2.SamplingParams(max_tokens=3, ignore_eos=True)

    async def run():
        async with grpc.aio.insecure_channel(prefill_addr) as pc, grpc.aio.insecure_channel(decode_addr) as dc:
            first = await prefill_pb2_grpc.PrefillStub(pc).Prefill(prefill_pb2.PrefillRequest(
                request_id="lease", token_ids=prompt, sampling=sampling), timeout=120)
            shards = sorted(first.kv.lease_ids)
            async with KvPoolClient(shards) as pool:
                pinned = await pool.delete(list(first.kv.block_keys))  # refused: every copy is leased
                chunks = [c async for c in decode_pb2_grpc.DecodeStub(dc).Decode(decode_pb2.DecodeRequest(
                    request_id="lease", prompt_token_ids=prompt, first_token=first.first_token, kv=first.kv,
                    sampling=sampling), timeout=120)]
                again = await pool.release(Lease(dict(first.kv.lease_ids), (), 0.0))  # the decode did it
            return shards, pinned, chunks, again

    shards, pinned, chunks, again = asyncio.run(run())
    assert len(shards) == 2 and pinned.deleted == 0 and pinned.refused_leased == 2 * 4  # 4 blocks x 2 replicas
    assert chunks[-1].finished and sum(len(c.token_ids) for c in chunks) == 2
    assert again == 0


def test_bad_input_fails_that_request_alone(stack):
    prefill_addr, decode_addr, _ = stack
    prompt = list(range(5, 30))
    sampling = common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)

    async def run():
        async with grpc.aio.insecure_channel(prefill_addr) as pc, grpc.aio.insecure_channel(decode_addr) as dc:
            first = await prefill_pb2_grpc.PrefillStub(pc).Prefill(prefill_pb2.PrefillRequest(
                request_id="bad", token_ids=prompt, sampling=sampling), timeout=120)
            decode = decode_pb2_grpc.DecodeStub(dc)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in decode.Decode(decode_pb2.DecodeRequest(
                        request_id="bad", prompt_token_ids=prompt, first_token=10**6, kv=first.kv,
                        sampling=sampling), timeout=120):
                    pass
            good = [c async for c in decode.Decode(decode_pb2.DecodeRequest(
                request_id="good", prompt_token_ids=prompt, first_token=first.first_token, kv=first.kv,
                sampling=sampling), timeout=120)]
            return err.value, good

    error, good = asyncio.run(run())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_token_ids" in error.details()
    assert sum(len(c.token_ids) for c in good) == 3 and good[-1].finished
    assert health_check_sync(decode_addr) == "SERVING"
