"""A prefill instance (2 dies over the fabric) with context caching in a 2-shard pool."""
from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
import pytest
import torch

from cloudmatrix.checkpoints import load_model
from cloudmatrix.costmodel import ub
from cloudmatrix.model.generate import generate
from cloudmatrix.sampling_params import SamplingParams
from cmx.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from cmx.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from tests.metrics_text import samples, scrape, types, value
from tests.services import running_services

pytestmark = pytest.mark.timeout(300)


@contextlib.contextmanager
def prefill_instance(run_dir, checkpoint, with_record: bool = False):
    base = [("kv0", "kvcache", ()), ("kv1", "kvcache", ()), ("fabric", "ub_fabric", ()),
            ("die0", "npu_emulator", ()), ("die1", "npu_emulator", ())]
    with running_services(run_dir, base) as r:
        sets = (f"checkpoint={checkpoint}", f"dies={r['die0'].address},{r['die1'].address}",
                f"fabric={r['fabric'].address}", f"kvcache={r['kv0'].address},{r['kv1'].address}",
                "block_size=16", "chunk_tokens=64")
        with running_services(run_dir, [("prefill", "prefill", sets)]) as p:
            shards = [r["kv0"].address, r["kv1"].address]
            yield (p["prefill"].address, shards, p["prefill"]) if with_record else (p["prefill"].address, shards)


@pytest.fixture(scope="module")
def instance(tmp_path_factory, tiny_checkpoint):
    with prefill_instance(tmp_path_factory.mktemp("prefill"), tiny_checkpoint) as addresses:
        yield addresses


def _prefill(address: str, request_id: str, tokens: list[int], **extra) -> prefill_pb2.PrefillReply:
    with grpc.insecure_channel(address) as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        return stub.Prefill(prefill_pb2.PrefillRequest(request_id=request_id, token_ids=tokens, **extra), timeout=120)


def _prefill_stream(address: str, request_id: str, tokens: list[int], **extra) -> list[prefill_pb2.PrefillReply]:
    with grpc.insecure_channel(address) as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        return list(stub.PrefillStream(prefill_pb2.PrefillRequest(request_id=request_id, token_ids=tokens, **extra),
                                       timeout=120))


def _hits(shards: list[str]) -> int:
    total = 0
    for address in shards:
        with grpc.insecure_channel(address) as channel:
            total += kvcache_pb2_grpc.KvCacheShardStub(channel).Stats(kvcache_pb2.StatsRequest(), timeout=10).hits
    return total


def test_first_token_matches_the_local_engine_and_a_shared_prefix_hits_the_pool(instance, tiny_checkpoint):
    address, shards = instance
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 1024, (330,), generator=gen).tolist()
    second = prompt[:320] + torch.randint(3, 1024, (10,), generator=gen).tolist()  # 20 of 20.6 blocks shared
    local = load_model(tiny_checkpoint)
    expected = [next(generate(local, p, SamplingParams(max_tokens=1))) for p in (prompt, second)]

    hits_before = _hits(shards)
    first = _prefill(address, "r1", prompt)
    repeat = _prefill(address, "r2", second)
    assert (first.first_token, repeat.first_token) == tuple(expected)
    assert first.cached_tokens == 0 and first.computed_tokens == 330
    assert repeat.cached_tokens == 320 and repeat.computed_tokens == 10
    assert _hits(shards) - hits_before >= 20  # the 20 shared blocks were read from the pool
    ttft = {r.request_id: {p.phase: p for p in r.timing.phases} for r in (first, repeat)}
    assert ttft["r2"]["compute"].modeled_s < ttft["r1"]["compute"].modeled_s
    # the 20 cached blocks' KV (fp32 [layers, 16, C+R] each) over UB, in the modeled total
    block_bytes = 4 * local.cfg.num_hidden_layers * 16 * (local.cfg.kv_lora_rank + local.cfg.qk_rope_head_dim)
    assert ttft["r1"]["cache_load"].modeled_s == 0.0
    assert ttft["r2"]["cache_load"].modeled_s == pytest.approx(ub.pool_transfer_s(20 * block_bytes))
    r2 = ttft["r2"]
    assert repeat.timing.modeled_s == pytest.approx(r2["compute"].modeled_s + r2["cache_load"].modeled_s)
    assert repeat.timing.measured_s < first.timing.measured_s
    assert len(first.kv.block_keys) == 21 and first.kv.num_tokens == 330  # 20 full + a tail


def test_disabling_the_context_cache_computes_everything(instance):
    address, _ = instance
    prompt = list(range(3, 103))
    _prefill(address, "warm", prompt)
    cold = _prefill(address, "cold", prompt, disable_context_cache=True)
    assert cold.cached_tokens == 0 and cold.computed_tokens == 100


@pytest.mark.parametrize("tokens,extra,needle", [
    ([], {}, "empty"), ([5, 99999], {}, "token_ids"), ([5, 6], {"model": "gpt-9"}, "gpt-9"),
])
@pytest.mark.parametrize("call", [_prefill, _prefill_stream])
def test_bad_prefill_requests_are_invalid_argument(instance, tokens, extra, needle, call):
    address, _ = instance
    with pytest.raises(grpc.RpcError) as err:
        call(address, "bad", tokens, **extra)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


def test_the_stream_answers_the_first_token_then_the_kv_handle_once_the_blocks_are_in_the_pool(
        instance, tiny_checkpoint):
    address, shards = instance
    prompt = torch.randint(3, 1024, (70,), generator=torch.Generator().manual_seed(11)).tolist()
    expected = next(generate(load_model(tiny_checkpoint), prompt, SamplingParams(max_tokens=1)))
    first, handoff = _prefill_stream(address, "s1", prompt, sampling={"max_tokens": 4})
    assert first.first_token == handoff.first_token == expected
    assert not first.HasField("kv") and first.computed_tokens == handoff.computed_tokens == 70
    phases = [{p.phase: p.measured_s for p in r.timing.phases} for r in (first, handoff)]
    assert "kv_write" not in phases[0] and phases[1]["kv_write"] > 0 and phases[0]["compute"] == phases[1]["compute"]
    # the handoff is what a decode needs: every block of the prompt in the pool, leased on each shard
    keys = list(handoff.kv.block_keys)
    assert len(keys) == 5 and handoff.kv.num_tokens == 70 and set(handoff.kv.lease_ids) == set(shards)
    for shard in shards:
        with grpc.insecure_channel(shard) as channel:
            stub = kvcache_pb2_grpc.KvCacheShardStub(channel)
            stub.Release(kvcache_pb2.ReleaseRequest(lease_ids=[handoff.kv.lease_ids[shard]]), timeout=10)
    assert _prefill(address, "s2", prompt).cached_tokens == 64  # the 4 full blocks, from the pool


def test_scheduler_metrics_are_exported(tmp_path, tiny_checkpoint):
    with prefill_instance(tmp_path, tiny_checkpoint, with_record=True) as (address, _, record):
        _prefill(address, "m1", list(range(3, 40)))
        _prefill(address, "m2", list(range(3, 40)))
        text = scrape(record.metrics_port)
    model = Path(tiny_checkpoint).resolve().name
    labels = {"model_name": model, "engine": "prefill-0"}  # vLLM's labels; no "instance" of our own
    assert value(text, "cmx_prefix_cache_queries_total", **labels) == 74
    assert value(text, "cmx_prefix_cache_hits_total", **labels) == 32  # 2 of m2's blocks
    assert value(text, "cmx_engine_step_modeled_seconds_count", **labels) >= 2
    assert samples(text, "cmx_kv_cache_usage_ratio", **labels)
    assert types(text)["cmx_engine_step_seconds"] == "histogram" and types(text)["cmx_prefix_cache_hits"] == "counter"
    assert not any("instance" in labels for labels, _ in samples(text, "cmx_num_requests_running"))


def test_the_prompt_is_leased_for_a_decode_only_when_one_follows(instance):
    """max_tokens 1: the first token ends the request (no decode reads the blocks), so nothing is
    pinned in the pool; otherwise every block of the prompt is leased."""
    address, shards = instance
    prompt = torch.randint(3, 1024, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    alone = _prefill(address, "alone", prompt, sampling={"max_tokens": 1})
    handed = _prefill(address, "handed", prompt[:39] + [7], sampling={"max_tokens": 8})
    assert not alone.kv.lease_ids and set(handed.kv.lease_ids) == set(shards)
    # Its two full blocks were in the pool before (leased by the prefill's Lookup), its tail is new
    # (it joined the lease with its Put): all three are pinned on both replicas until released.
    keys = list(handed.kv.block_keys)
    assert len(keys) == 3 and keys[:2] == list(alone.kv.block_keys[:2]) and handed.cached_tokens == 32
    for shard in shards:
        with grpc.insecure_channel(shard) as channel:
            stub = kvcache_pb2_grpc.KvCacheShardStub(channel)
            assert stub.Delete(kvcache_pb2.DeleteRequest(keys=keys), timeout=10).refused_leased == 3
            assert stub.Release(kvcache_pb2.ReleaseRequest(lease_ids=[handed.kv.lease_ids[shard]]),
                                timeout=10).released == 1
