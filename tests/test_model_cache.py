"""Model caching: the first die to load publishes its weights to the pool; the next reads them
from the pool and computes the same log-probabilities."""
from __future__ import annotations

import asyncio

import pytest

from cloudmatrix.instance.driver import InstanceDriver
from cloudmatrix.kvcache import KvPoolClient
from cloudmatrix.model_cache import SHARED, blob_name
from tests.instance_steps import position_logprobs
from tests.services import running_services

pytestmark = pytest.mark.timeout(240)


def test_second_load_comes_from_the_pool_with_identical_logits(tmp_path, tiny_checkpoint):
    specs = [("kv0", "kvcache", ()), ("kv1", "kvcache", ()), ("die", "npu_emulator", ())]
    with running_services(tmp_path, specs) as records:
        shards = [records["kv0"].address, records["kv1"].address]

        async def load_and_step():
            driver = InstanceDriver([records["die"].address])
            try:
                blocks = await driver.load(str(tiny_checkpoint), "fp32", model_cache=shards, cache_prefix="models/tiny")
                [logprobs] = await position_logprobs(driver, blocks, [[0, 5, 6, 7, 8]])
                return driver.loaded[0].from_model_cache, logprobs
            finally:
                await driver.close()

        first_cached, first = asyncio.run(load_and_step())
        second_cached, second = asyncio.run(load_and_step())

        async def blobs():
            async with KvPoolClient(shards) as client:
                return await client.get_blob(blob_name("models/tiny", SHARED))

        assert not first_cached and second_cached
        assert first == second  # every position's log-probabilities and alternatives, bit for bit
        assert asyncio.run(blobs())  # the shared unit is in the pool


def test_float_checkpoint_served_int8_must_be_quantized_first(tmp_path, tiny_checkpoint):
    specs = [("kv0", "kvcache", ()), ("die", "npu_emulator", ())]
    with running_services(tmp_path, specs) as records:
        async def load():
            driver = InstanceDriver([records["die"].address])
            try:
                await driver.load(str(tiny_checkpoint), "int8", model_cache=[records["kv0"].address])
            finally:
                await driver.close()

        with pytest.raises(Exception, match="cmx quantize"):
            asyncio.run(load())
