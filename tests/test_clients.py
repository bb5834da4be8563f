"""cloudmatrix.clients against real service processes: every RPC of every service through its
client (async, and the blocking SyncClient), checked against independent references (the local
engine, exact integer matmul, the bytes that were written); and the clients' own behaviour:
error kinds, retries of idempotent calls only, deadlines and trace propagation."""
from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider

from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.clients import (
    CallError,
    ClientOptions,
    DeadlineExceeded,
    DecodeClient,
    FabricClient,
    GatewayClient,
    InvalidArgument,
    KvShardClient,
    NpuClient,
    PrefillClient,
    Sampling,
    SyncClient,
    Unavailable,
)
from cloudmatrix.kvcache import Block
from cloudmatrix.kvcache.blobs import CorruptBlob
from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.topology import parse_topology
from cloudmatrix.model.generate import generate
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.rpc.errors import PeerUnavailable
from cloudmatrix.rpc.tensor_codec import encode_tensor
from cloudmatrix.sampling_params import SamplingParams
from cmx.common.v1 import common_pb2
from cmx.decode.v1 import decode_pb2, decode_pb2_grpc
from cmx.npu.v1 import npu_pb2

pytestmark = pytest.mark.timeout(600)
MISSING = bytes(16)  # a key nobody stores


def run(coro, timeout_s: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_checkpoint):
    """The default layout (fp32) plus a spare die that no instance drives."""
    run_dir = tmp_path_factory.mktemp("clients-run").resolve()
    common = {"checkpoint": str(tiny_checkpoint), "precision": "fp32", "fabric": "{addresses:fabric}",
              "kvcache": "{addresses:kvcache}"}
    raw = {"name": "clients", "services": [
        {"name": "kvcache", "service": "kvcache", "count": 2}, {"name": "fabric", "service": "ub_fabric"},
        {"name": "pdie", "service": "npu_emulator"}, {"name": "ddie", "service": "npu_emulator", "count": 2},
        {"name": "spare", "service": "npu_emulator"},
        {"name": "prefill", "service": "prefill", "set": {**common, "dies": "{addresses:pdie}"}},
        {"name": "decode", "service": "decode", "set": {**common, "dies": "{addresses:ddie}"}},
        {"name": "gateway", "service": "gateway", "set": {"checkpoint": str(tiny_checkpoint),
                                                          "prefill": "{addresses:prefill}",
                                                          "decode": "{addresses:decode}"}}]}
    records = bring_up(parse_topology(raw, Path(".")), run_dir, 180.0)
    try:
        yield {r.name: r.address for r in records}
    finally:
        bring_down(run_dir, grace_s=10.0)


def _local_tokens(checkpoint, prompt_ids: list[int], n: int) -> list[int]:
    model = load_for_precision(checkpoint, parse_precision("fp32"))
    return list(generate(model, prompt_ids, SamplingParams(max_tokens=n)))


def test_gateway_client_lists_models_and_streams_the_local_engines_tokens(stack, tiny_checkpoint):
    prompt_ids = TextTokenizer.load(tiny_checkpoint).encode("The supernode routes every token")

    async def scenario():
        async with GatewayClient(stack["gateway-0"]) as gateway:
            models = await gateway.list_models()
            chunks = [c async for c in gateway.generate(models[0].id, prompt_ids, Sampling(max_tokens=6))]
        return models, chunks

    models, chunks = run(scenario())
    assert [m.id for m in models] == ["tiny"] and models[0].max_context_tokens > 0
    assert [t for c in chunks for t in c.token_ids] == _local_tokens(tiny_checkpoint, prompt_ids, 6)
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage["completion_tokens"] == 6
    assert chunks[-1].usage["prompt_tokens"] == len(prompt_ids) and chunks[-1].timing.modeled_s > 0
    assert len({c.request_id for c in chunks}) == 1


def test_sync_gateway_client_streams_and_stops_early(stack):
    with SyncClient(GatewayClient, stack["gateway-0"]) as gateway:
        model = gateway.list_models()[0].id
        text = "".join(c.text for c in gateway.generate(model, "Dispatch and combine", Sampling(max_tokens=4)))
        first = next(iter(gateway.generate(model, "A stream left after one chunk", Sampling(max_tokens=40))))
        assert gateway.list_models()[0].id == model  # the client still works after a call left early
    assert isinstance(text, str) and first.token_ids
    with pytest.raises(RuntimeError, match="closed"):
        gateway.list_models()


def test_prefill_then_decode_through_their_clients_equals_the_local_engine(stack, tiny_checkpoint):
    prompt_ids = TextTokenizer.load(tiny_checkpoint).encode("Blocks are addressed by the hash of their tokens")
    rid = uuid.uuid4().hex

    async def scenario():
        async with PrefillClient(stack["prefill-0"]) as prefill, DecodeClient(stack["decode-0"]) as decode:
            first = await prefill.prefill(rid, "tiny", prompt_ids, Sampling(max_tokens=5))
            steps = [s async for s in decode.decode(rid, "tiny", prompt_ids, first.first_token, first.kv,
                                                    Sampling(max_tokens=5))]
            loads = await prefill.load(), await decode.load()
            cancelled = await decode.cancel(rid)  # finished: nothing to cancel
            return first, steps, loads, cancelled

    first, steps, (p_load, d_load), cancelled = run(scenario())
    tokens = [first.first_token] + [t for s in steps for t in s.token_ids]
    assert tokens == _local_tokens(tiny_checkpoint, prompt_ids, 5)
    assert steps[-1].finish_reason == "length" and first.computed_tokens + first.cached_tokens == len(prompt_ids)
    assert first.timing.modeled_s > 0 and "compute" in " ".join(first.timing.measured)
    assert p_load.instance_id and d_load.kv_blocks_total > 0 and cancelled is False


def test_decode_cancel_ends_a_running_stream(stack, tiny_checkpoint):
    prompt_ids = TextTokenizer.load(tiny_checkpoint).encode("A long answer nobody waits for")
    rid = uuid.uuid4().hex

    async def scenario():
        async with PrefillClient(stack["prefill-0"]) as prefill, DecodeClient(stack["decode-0"]) as decode:
            sampling = Sampling(max_tokens=400, ignore_eos=True)
            ahead, first = [r async for r in prefill.prefill_stream(rid, "tiny", prompt_ids, sampling)]
            assert ahead.kv is None and first.kv is not None and ahead.first_token == first.first_token
            steps = []
            async for step in decode.decode(rid, "tiny", prompt_ids, first.first_token, first.kv, sampling):
                steps.append(step)
                if len(steps) == 2:
                    assert await decode.cancel(rid) is True
            return steps

    steps = run(scenario())
    assert steps[-1].finish_reason == "cancelled" and sum(len(s.token_ids) for s in steps) < 399


def test_npu_client_calls_every_die_rpc(stack, tiny_checkpoint):
    prompt_ids = TextTokenizer.load(tiny_checkpoint).encode("One die on its own")
    a = torch.randint(-128, 128, (8, 32), dtype=torch.int8)
    b = torch.randint(-128, 128, (16, 32), dtype=torch.int8)  # [N, K]

    async def scenario():
        async with NpuClient(stack["spare-0"]) as die:
            before = await die.die_info()
            loaded = await die.load_model(str(tiny_checkpoint), precision="fp32", model_id="tiny-spare")
            info = await die.die_info()
            blocks = await die.allocate_blocks(4)
            reply = await die.forward(1, [npu_pb2.SequenceInput(
                seq_id="s", token_ids=prompt_ids, block_table=blocks,
                sampling=common_pb2.SamplingParams(max_tokens=1))])
            kv = await die.read_blocks([(blocks[0], info.kv_block_size)])
            noise = torch.randn_like(kv[0])
            written = await die.write_blocks([(blocks[1], noise)])
            back = await die.read_blocks([(blocks[1], info.kv_block_size)])
            outputs, timing = await die.run_kernel("int8_gemm", {"a": a, "b": b})
            load = await die.expert_load()
            free = await die.free_blocks(blocks)
            with pytest.raises(InvalidArgument, match="kernel"):
                await die.run_kernel("no_such_kernel", {"a": a})
            return before, loaded, info, blocks, reply, kv, noise, written, back, outputs, timing, load, free

    before, loaded, info, blocks, reply, kv, noise, written, back, outputs, timing, load, free = run(scenario())
    assert before.model_id == "" and loaded.model_id == info.model_id == "tiny-spare" and info.precision == "fp32"
    assert len(blocks) == 4 and free == info.kv_blocks_free
    assert reply.outputs[0].token_id == _local_tokens(tiny_checkpoint, prompt_ids, 1)[0]
    assert kv[0].shape[1] == info.kv_block_size and kv[0].abs().sum() > 0  # the forward wrote its KV there
    assert written > 0 and torch.equal(back[0], noise)
    assert torch.equal(outputs["out"], a.int() @ b.int().T) and timing.modeled_s > 0
    assert load.token_counts.dtype == torch.int64 and load.token_counts.sum() > 0
    assert load.layers == (1, 2, 3) and load.token_counts.shape == (3, 16)  # tiny: MoE layers 1-3, 16 experts


def test_a_die_holds_a_sequence_between_steps_and_forgets_it_when_told(stack, tiny_checkpoint):
    """The block table and sampling go once; the next step sends only new tokens and new blocks
    (cached). Prompt log-probabilities across the two chunks equal the in-process model's."""
    prompt = TextTokenizer.load(tiny_checkpoint).encode("Two chunks, one sequence, the die keeps it")[:10]
    sampling = common_pb2.SamplingParams(max_tokens=1, prompt_logprobs=2, logprobs=2)

    async def scenario():
        async with NpuClient(stack["spare-0"]) as die:
            await die.load_model(str(tiny_checkpoint), precision="fp32", model_id="tiny-held", block_size=4)
            blocks = await die.allocate_blocks(3)
            first = await die.forward(1, [npu_pb2.SequenceInput(
                seq_id="s", token_ids=prompt[:4], block_table=blocks[:1], sampling=sampling, skip_sampling=True,
                following_token=prompt[4])])
            second = await die.forward(2, [npu_pb2.SequenceInput(
                seq_id="s", token_ids=prompt[4:], start_position=4, block_table=blocks[1:], cached=True)])
            errors = []
            for finished, seq_id in ((["s"], "s"), ([], "never-sent")):
                with pytest.raises(InvalidArgument) as err:
                    await die.forward(3, [npu_pb2.SequenceInput(seq_id=seq_id, token_ids=[5], start_position=10,
                                                                cached=True)], finished_seq_ids=finished)
                errors.append(err.value)
            await die.free_blocks(blocks)
            return first.outputs[0], second.outputs[0], errors

    first, second, errors = run(scenario())
    model = load_for_precision(tiny_checkpoint, parse_precision("fp32"))
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([prompt]), torch.arange(len(prompt))[None], model.new_cache())[0], -1)
    got = [*first.prompt_logprobs, *second.prompt_logprobs, second.sampled_logprobs]
    assert [t.token_id for t in got] == prompt[1:] + [int(ref[-1].argmax())] and second.has_token
    for position, t in enumerate(got):
        assert abs(t.logprob - ref[position, t.token_id].item()) < 1e-4
        assert torch.allclose(torch.tensor(list(t.top_logprobs)), ref[position].topk(2).values, atol=1e-4)
    assert all(e.field == "sequences.cached" and "does not hold it" in e.details() for e in errors)


def test_fabric_client_stats_waiting_and_attach(stack):
    async def scenario():
        async with FabricClient(stack["fabric-0"]) as fabric:
            group = f"client-test-{uuid.uuid4().hex[:6]}"
            links = await asyncio.gather(fabric.attach(0, 2, group), fabric.attach(1, 2, group))
            stats = await fabric.stats()
            waiting = await fabric.waiting(group, step=1, layer=0)
            for link in links:
                link.close()
            return stats, waiting

    stats, waiting = run(scenario())
    assert stats.attached_dies >= 4  # the decode instance's two dies and the two links above
    assert stats.rounds_completed > 0 and sum(link.bytes for link in stats.links) > 0  # the decode instance's
    assert waiting is None  # no die has sent a bundle of that round


def test_kvcache_shard_client_calls_every_shard_rpc(stack):
    data = encode_tensor(torch.randn(2, 16, 8)).SerializeToString()  # a block holds a serialized tensor
    key = uuid.uuid4().bytes
    blob = os.urandom(3 * 1024 + 17)

    async def scenario():
        async with KvShardClient(stack["kvcache-0"]) as shard:
            put = await shard.put_blocks([Block(key, "tiny/fp32", "full", 16, data)])
            again = await shard.put_blocks([Block(key, "tiny/fp32", "full", 16, data)])
            got = await shard.get_blocks([key, MISSING])
            present, longest = await shard.lookup([key, MISSING])
            listed = await shard.all_keys(page=1)
            lease = await shard.lease([key, MISSING], ttl_s=30.0)
            refused = await shard.delete([key])
            released = await shard.release([lease.lease_id])
            deleted = await shard.delete([key])
            stored = await shard.put_blob(f"blob-{key.hex()}", blob, chunk_bytes=1000)
            blob_back = await shard.get_blob(f"blob-{key.hex()}")
            with pytest.raises(CallError) as missing_blob:
                await shard.get_blob("no-such-blob")
            stats = await shard.stats()
            return put, again, got, present, longest, lease, refused, released, deleted, stored, blob_back, \
                missing_blob.value, stats, listed

    put, again, got, present, longest, lease, refused, released, deleted, stored, blob_back, missing, stats, listed = \
        run(scenario())
    assert key in listed and listed == sorted(listed)  # every key the shard holds, ascending, paged
    assert [o.status for o in put] == ["stored"] and [o.status for o in again] == ["duplicate"]
    assert got[key].data == data and got[key].num_tokens == 16 and got[MISSING] is None
    assert present == [True, False] and longest == 1
    assert lease.leased == [True, False] and lease.ttl_s > 0
    assert refused["refused_leased"] == 1 and released == 1 and deleted["deleted"] == 1
    assert stored == len(blob) and blob_back == blob
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert stats["stored"] >= 1 and stats["blobs"] >= 1 and set(stats) >= {"hits", "misses", "evictions"}
    assert not issubclass(CorruptBlob, CallError)


class FlakyDecode(decode_pb2_grpc.DecodeServicer):
    """GetLoad fails UNAVAILABLE ``failures`` times, then answers; Cancel always fails; every
    call's metadata is kept; Decode never answers (deadlines)."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.metadata = failures, {"GetLoad": 0, "Cancel": 0}, []

    async def GetLoad(self, request, context):
        self.calls["GetLoad"] += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.calls["GetLoad"] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return decode_pb2.GetLoadReply(load=common_pb2.InstanceLoad(instance_id="flaky", running_requests=3))

    async def Cancel(self, request, context):
        self.calls["Cancel"] += 1
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")

    async def Decode(self, request, context):
        await asyncio.sleep(60)
        yield decode_pb2.DecodeChunk()


async def _with_flaky(failures: int, body):
    server = grpc.aio.server()
    servicer = FlakyDecode(failures)
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await body(f"127.0.0.1:{port}", servicer)
    finally:
        await server.stop(None)


def test_idempotent_calls_are_retried_on_unavailable_others_are_not():
    async def body(address, servicer):
        async with DecodeClient(address, ClientOptions(retries=2, backoff_s=0.01)) as client:
            load = await client.load()
            calls_after_load = servicer.calls["GetLoad"]
            servicer.calls["GetLoad"], servicer.failures = 0, 5
            with pytest.raises(Unavailable) as exhausted:
                await client.load()
            with pytest.raises(InvalidArgument, match="request_id") as invalid:
                await client.cancel("")
            return load, calls_after_load, servicer.calls, exhausted.value, invalid.value

    load, calls_after_load, calls, exhausted, invalid = run(_with_flaky(2, body))
    assert load.instance_id == "flaky" and load.running == 3 and calls_after_load == 3  # 2 failures + 1
    assert calls["GetLoad"] == 3  # 1 + retries=2, then it gives up
    assert calls["Cancel"] == 1  # INVALID_ARGUMENT is an answer: never retried
    assert isinstance(exhausted, PeerUnavailable) and isinstance(exhausted, grpc.aio.AioRpcError)
    assert "GetLoad" in str(exhausted) and exhausted.address in str(exhausted)
    assert isinstance(invalid, ValueError) and invalid.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deadlines_apply_to_streams_and_an_unreachable_address_is_unavailable():
    async def body(address, servicer):
        async with DecodeClient(address, ClientOptions(deadline_s=0.3)) as client:
            with pytest.raises(DeadlineExceeded) as late:
                async for _ in client.decode("r", "tiny", [1, 2], 3, common_pb2.KvHandle()):
                    pass
        return late.value

    late = run(_with_flaky(0, body))
    assert isinstance(late, TimeoutError) and late.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def unreachable():
        async with PrefillClient("127.0.0.1:1", ClientOptions(deadline_s=5.0, retries=3, backoff_s=0.01)) as client:
            with pytest.raises(Unavailable) as down:
                await client.load()
        return down.value

    assert run(unreachable()).code() == grpc.StatusCode.UNAVAILABLE


def test_the_callers_trace_context_and_metadata_travel_with_every_call():
    provider = TracerProvider()

    async def body(address, servicer):
        async with DecodeClient(address, ClientOptions(metadata=(("x-api-key", "k1"),))) as client:
            with provider.get_tracer("test").start_as_current_span("caller") as span:
                await client.load()
        return span.get_span_context(), servicer.metadata[-1]

    context, metadata = run(_with_flaky(0, body))
    # no gRPC instrumentation in this process: the client itself injected the caller's context
    assert metadata["x-api-key"] == "k1"
    _, trace_id, span_id, _ = metadata["traceparent"].split("-")
    assert (trace_id, span_id) == (format(context.trace_id, "032x"), format(context.span_id, "016x"))
