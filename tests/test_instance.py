"""An expert-parallel instance of real processes: 1 fabric + 4 dies (EP4, attention DP4)."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.instance.driver import InstanceDriver
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.moe.eplb import balance, imbalance
from cloudmatrix.moe.placement import ExpertPlacement
from cloudmatrix.sampling_params import TokenLogprobs
from cmx.fabric.v1 import fabric_pb2, fabric_pb2_grpc
from tests.instance_steps import alternatives_are_the_most_likely, max_error, position_logprobs, reference_logprobs
from tests.services import running_services

TOL = 1e-4
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("instance")
    die_sets = ("round_timeout_s=5",)
    specs = [("fabric", "ub_fabric", ())] + [(f"die{i}", "npu_emulator", die_sets) for i in range(4)]
    with running_services(run_dir, specs) as records:
        yield records["fabric"].address, [records[f"die{i}"].address for i in range(4)]


def _prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


async def _distributed(addresses, fabric, checkpoint, precision, prompts, extra, **load):
    """Each prompt in one step, then its extra tokens in the next (a cached prefix): the dies'
    log-probabilities at every position, and the last step's replies."""
    driver = InstanceDriver(addresses, fabric, group=f"g{len(addresses)}-{precision}-{load.get('dispatch_dtype', '')}")
    try:
        blocks = await driver.load(str(checkpoint), precision, block_size=4, **load)
        got = await position_logprobs(driver, blocks, [p + e for p, e in zip(prompts, extra)],
                                      chunk_tokens=max(len(p) for p in prompts))
        return got, driver.last_replies
    finally:
        await driver.close()


def _placement(dies: int, replicas: int) -> ExpertPlacement:
    experts = tuple(tuple((e + r) % dies for r in range(replicas)) for e in range(16))
    return ExpertPlacement(dies, 16, {layer: experts for layer in (1, 2, 3)})


@pytest.mark.parametrize("dies,replicas", [(4, 1), (2, 1), (4, 2)])
def test_distributed_logprobs_equal_in_process(cluster, tiny_checkpoint, dies, replicas):
    fabric, addresses = cluster
    prompts, extra = _prompts(8, seed=dies + replicas), [[5, 6]] * 8
    model = load_for_precision(tiny_checkpoint, parse_precision("fp32"))
    got, replies = asyncio.run(_distributed(addresses[:dies], fabric, tiny_checkpoint, "fp32", prompts, extra,
                                            placement=_placement(dies, replicas)))
    for g, p, e in zip(got, prompts, extra):
        ref = reference_logprobs(model, p + e)
        assert [lp.token_id for lp in g[:-1]] == (p + e)[1:]  # the sequence's own next tokens
        assert g[-1].token_id == int(ref[-1].argmax())        # then the greedy sample
        assert max_error(g, ref) <= TOL and alternatives_are_the_most_likely(g, ref, TOL)
    timing = replies[0].timing
    phases = {p.phase for p in timing.phases}
    assert {"attention", "experts", "dispatch", "combine"} <= phases and timing.modeled_s > 0 and timing.measured_s > 0


async def _fabric_bytes(fabric: str) -> int:
    """Dispatch bytes on the wire since the last call (the counters are reset)."""
    async with grpc.aio.insecure_channel(fabric) as channel:
        stats = await fabric_pb2_grpc.UbFabricStub(channel).Stats(fabric_pb2.StatsRequest(reset=True), timeout=10)
    assert sum(link.dispatch_bytes + link.combine_bytes for link in stats.links) == sum(l.bytes for l in stats.links)
    return sum(link.dispatch_bytes for link in stats.links)


def _centered(lp: TokenLogprobs, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dies' top log-probabilities and the reference's for the same ids, each minus its mean:
    logits up to a constant, comparable across precisions."""
    ids = [i for i, _ in lp.top]
    got, want = torch.tensor([v for _, v in lp.top]), ref[ids]
    return got - got.mean(), want - want.mean()


def test_int8_dispatch_cuts_fabric_bytes_and_matches_the_in_process_int8_model(cluster, tiny_checkpoint):
    fabric, addresses = cluster
    prompts, extra = _prompts(8, seed=3), [[7]] * 8

    async def run(precision, dtype):
        await _fabric_bytes(fabric)  # reset
        got, _ = await _distributed(addresses, fabric, tiny_checkpoint, precision, prompts, extra,
                                    dispatch_dtype=dtype)
        return got, await _fabric_bytes(fabric)

    _, bf16_bytes = asyncio.run(run("fp32", "bfloat16"))
    int8_got, int8_bytes = asyncio.run(run("int8", ""))
    print(f"dispatch bytes: int8 {int8_bytes}, bf16 {bf16_bytes}, cut {1 - int8_bytes / bf16_bytes:.1%}")
    assert 0 < int8_bytes <= 0.55 * bf16_bytes, (int8_bytes, bf16_bytes)  # >= 45% fewer dispatch bytes
    # Within docs/int8.md's bound for the tiny preset (logits rel-L2 < 0.005 against fp32), on the
    # top alternatives' logits (log-probabilities up to a constant). Exact equality with the
    # in-process W8A8 path holds for identical batches (test_expert_parallel.py); here batches are
    # padded differently, and a 1e-7 float difference can flip an int8 rounding.
    fp32_model = load_for_precision(tiny_checkpoint, parse_precision("fp32"))
    int8_model = load_for_precision(tiny_checkpoint, parse_precision("int8"))
    pairs = [_centered(lp, ref) for g, p, e in zip(int8_got, prompts, extra)
             for lp, ref in zip(g, reference_logprobs(fp32_model, p + e))]
    got, want = torch.cat([g for g, _ in pairs]), torch.cat([w for _, w in pairs])
    assert 0 < ((got - want).norm() / want.norm()).item() < 0.005
    assert max(max_error(g, reference_logprobs(int8_model, p + e)) for g, p, e in zip(int8_got, prompts, extra)) < 1e-2


def test_expert_load_feeds_eplb(cluster, tiny_checkpoint):
    fabric, addresses = cluster

    async def scenario():
        driver = InstanceDriver(addresses, fabric, group="eplb")
        try:
            blocks = await driver.load(str(tiny_checkpoint), "fp32", block_size=4)
            await position_logprobs(driver, blocks, _prompts(8, seed=9))  # one step: the prompts
            return await driver.expert_load(reset=True), sum(len(p) for p in _prompts(8, seed=9))
        finally:
            await driver.close()

    counts, tokens = asyncio.run(scenario())
    assert counts.shape == (3, 16) and (counts.sum(dim=1) == tokens * 4).all()  # every (token, top-4) pair once
    placement = balance(counts, num_dies=4, redundant=4)
    assert imbalance(placement, counts) <= imbalance(ExpertPlacement.round_robin([0, 1, 2], 16, 4), counts)
