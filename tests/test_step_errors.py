"""A bug is not a dead die: a TypeError inside a die's Forward handler fails that step's requests
with INTERNAL, is logged with its traceback (die and instance), and the instance keeps serving
the next requests on the same loaded dies, without a reload."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from cloudmatrix.checkpoints import load_model
from cloudmatrix.clients import PrefillClient
from cloudmatrix.model.generate import generate
from cloudmatrix.sampling_params import SamplingParams
from tests.services import log_text, running_services

pytestmark = pytest.mark.timeout(240)


def test_a_type_error_in_forward_fails_its_step_not_the_instance(tmp_path, tiny_checkpoint):
    prompts = [[5, 17, 33, 8], [9, 10, 11], [40, 41, 42, 43, 44]]
    local = load_model(tiny_checkpoint)
    expected = [next(generate(local, p, SamplingParams(max_tokens=1))) for p in prompts]
    with running_services(tmp_path, [("die", "npu_emulator", ("fail_forwards=2",))]) as dies:
        instance = (f"checkpoint={tiny_checkpoint}", f"dies={dies['die'].address}", "instance_id=prefill-bug")
        with running_services(tmp_path, [("prefill", "prefill", instance)]) as p:

            async def scenario():
                async with PrefillClient(p["prefill"].address) as client:
                    outcomes = []
                    for i, prompt in enumerate(prompts):  # one step each: the second is the faulty one
                        try:
                            outcomes.append((await client.prefill(f"r{i}", "", prompt, deadline_s=60)).first_token)
                        except grpc.aio.AioRpcError as err:
                            outcomes.append(err)
                    return outcomes

            first, failed, third = asyncio.run(scenario())
            prefill_log, die_log = log_text(p["prefill"]), log_text(dies["die"])
    assert first == expected[0] and third == expected[2]
    assert failed.code() == grpc.StatusCode.INTERNAL and "TypeError" not in failed.details()
    assert "fault hook: Forward call 2" in die_log and "Traceback" in die_log
    assert "a step failed on an error" in prefill_log and "Traceback" in prefill_log
    assert prefill_log.count("dies loaded") == 1  # no reload
    assert "stops serving" not in prefill_log
