"""Faults on the fabric: a die killed or stalled mid-round fails its peers' Forward with UNAVAILABLE
within the round deadline, never a hang, and the fabric keeps serving the rest."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import grpc
import pytest

from cloudmatrix.clients.fabric import FabricClient
from cloudmatrix.instance.driver import InstanceDriver, StepFailed
from cloudmatrix.instance.request import Request
from cloudmatrix.instance.step import ScheduledChunk
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.sampling_params import SamplingParams, StopRule
from cmx.fabric.v1 import fabric_pb2, fabric_pb2_grpc
from cmx.npu.v1 import npu_pb2
from tests.instance_steps import position_logprobs
from tests.services import running_services
from tests.test_kvcache_client import free_port

ROUND_TIMEOUT_S = 3.0
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def instance(tmp_path):
    specs = [("fabric", "ub_fabric", ())] + [
        (f"die{i}", "npu_emulator", (f"round_timeout_s={ROUND_TIMEOUT_S}",)) for i in range(4)]
    with running_services(tmp_path, specs) as records:
        yield records


async def _logged(path, text: str, timeout_s: float = 60.0) -> None:
    """Wait until a process's log file has a line containing ``text``."""
    async def poll():
        while not (path.is_file() and text in path.read_text()):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


async def _peers_forward(driver: InstanceDriver, dies: list[int]):
    """Forward one sequence on each listed die only; returns (elapsed seconds, per-die outcome)."""
    calls = []
    for i in dies:  # the load claimed every block of the dies for the instance: use block 0
        seq = npu_pb2.SequenceInput(seq_id=f"s{i}", token_ids=[5, 6, 7], block_table=[0])
        calls.append(driver.dies[i].forward(1, [seq], deadline_s=60))
    start = time.monotonic()
    results = await asyncio.gather(*calls, return_exceptions=True)
    return time.monotonic() - start, results


def _fabric_stats(address: str) -> fabric_pb2.StatsReply:
    with grpc.insecure_channel(address) as channel:
        return fabric_pb2_grpc.UbFabricStub(channel).Stats(fabric_pb2.StatsRequest(), timeout=10)


def _assert_unavailable(results, needle: str) -> None:
    for r in results:
        assert isinstance(r, grpc.aio.AioRpcError), r
        assert r.code() == grpc.StatusCode.UNAVAILABLE and needle in r.details(), r.details()


def test_killed_die_fails_its_peers_fast_and_the_fabric_serves_on(instance, tiny_checkpoint):
    fabric, dies = instance["fabric"].address, [instance[f"die{i}"] for i in range(4)]

    async def scenario():
        driver = InstanceDriver([d.address for d in dies], fabric, group="ep4")
        await driver.load(str(tiny_checkpoint), "fp32", block_size=4)
        forward = asyncio.ensure_future(_peers_forward(driver, [0, 1, 2]))
        async with FabricClient(fabric) as client:  # dies 0-2 wait in the first dispatch round for die 3
            while await client.waiting("ep4", step=1, layer=1) != [3]:
                await asyncio.sleep(0.02)
        os.kill(dies[3].pid, signal.SIGKILL)
        elapsed, results = await forward
        await driver.close()
        return elapsed, results

    _, results = asyncio.run(scenario())
    _assert_unavailable(results, "die 3")
    assert all("within" not in r.details() for r in results)  # told by the fabric, not by the round deadline
    assert health_check_sync(fabric) == "SERVING"
    assert _fabric_stats(fabric).attached_dies == 3

    async def survivors():  # the remaining dies form a new EP3 instance and step normally
        driver = InstanceDriver([d.address for d in dies[:3]], fabric, group="ep3")
        try:
            blocks = await driver.load(str(tiny_checkpoint), "fp32", block_size=4)
            return await position_logprobs(driver, blocks, [[3, 4, 5]] * 3)
        finally:
            await driver.close()

    assert all(len(logprobs) == 3 for logprobs in asyncio.run(survivors()))  # each got its sampled token


def test_stalled_die_fails_its_peers_at_the_round_deadline(instance, tiny_checkpoint):
    fabric, dies = instance["fabric"].address, [instance[f"die{i}"] for i in range(4)]

    async def scenario():
        driver = InstanceDriver([d.address for d in dies], fabric, group="ep4-stall")
        await driver.load(str(tiny_checkpoint), "fp32", block_size=4)
        result = await _peers_forward(driver, [0, 1, 2])  # die 3 never steps
        await driver.close()
        return result

    _, results = asyncio.run(scenario())
    _assert_unavailable(results, f"no bundle from dies [3] within {ROUND_TIMEOUT_S}")  # the round's deadline


def test_driver_reports_which_dies_failed(instance, tiny_checkpoint):
    fabric, dies = instance["fabric"].address, [instance[f"die{i}"] for i in range(2)]

    async def scenario():
        driver = InstanceDriver([d.address for d in dies], fabric, group="ep2-bad")
        blocks = await driver.load(str(tiny_checkpoint), "fp32", block_size=4)
        request = Request("bad", [5000], SamplingParams(), StopRule(1))  # token id beyond the vocab
        request.die, request.blocks = 0, blocks.allocate(0, 1)
        try:
            with pytest.raises(StepFailed, match="INVALID_ARGUMENT") as err:
                await driver.forward([ScheduledChunk(request, [5000], 0, True)])
            return err.value
        finally:
            await driver.close()

    failure = asyncio.run(scenario())
    codes = {die: err.code() for die, err in failure.errors}
    assert codes[0] == grpc.StatusCode.INVALID_ARGUMENT  # the die holding the bad sequence
    assert codes.get(1) == grpc.StatusCode.UNAVAILABLE  # its peer waited for a round that never came


def test_dies_loading_before_their_fabric_listens_wait_for_it(tmp_path, tiny_checkpoint):
    """The containers of a Kubernetes pod start in any order: a LoadModel that reaches the dies
    before the fabric listens waits for the fabric (within fabric_connect_timeout_s) instead of
    failing on the refused connection."""
    port = free_port()
    with running_services(tmp_path, [(f"die{i}", "npu_emulator", ()) for i in range(2)]) as dies:
        async def scenario():
            driver = InstanceDriver([dies[f"die{i}"].address for i in range(2)], f"127.0.0.1:{port}", group="late")
            loading = asyncio.ensure_future(driver.load(str(tiny_checkpoint), "fp32", block_size=4))
            for i in range(2):  # the LoadModel calls reached the dies, which wait for the fabric
                await _logged(tmp_path / "logs" / f"die{i}.log", "joining the fabric group")
            assert not loading.done()  # no fabric yet: the dies wait for it
            with contextlib.ExitStack() as stack:
                await asyncio.to_thread(stack.enter_context,
                                        running_services(tmp_path, [("fabric", "ub_fabric", (f"server.port={port}",))]))
                await loading
                return [m.num_local_experts for m in driver.loaded]

        assert len(asyncio.run(scenario())) == 2
