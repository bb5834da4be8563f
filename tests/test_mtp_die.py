"""One die process with the MTP module (LoadModel speculative_tokens 1) over gRPC: a prompt step
proposes a draft, the next step verifies it and gives the greedy tokens of the plain model, the
KV blocks hold the MTP layer, the modeled time prices the module, and bad drafts are refused by
field while the die keeps serving."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from cloudmatrix.checkpoints import load_model
from cloudmatrix.clients.npu import NpuClient
from cloudmatrix.model.generate import generate
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.sampling_params import SamplingParams
from cmx.common.v1 import common_pb2
from cmx.npu.v1 import npu_pb2
from tests.services import running_service
from tests.test_shipped_model import MODEL


@pytest.fixture(scope="module")
def die(tmp_path_factory):
    with running_service("npu_emulator", tmp_path_factory.mktemp("mtp-die")) as record:
        yield record.address


def _input(seq_id: str, tokens: list[int], start: int, blocks: list[int], **extra) -> npu_pb2.SequenceInput:
    return npu_pb2.SequenceInput(seq_id=seq_id, token_ids=tokens, start_position=start, block_table=blocks,
                                 sampling=common_pb2.SamplingParams(), **extra)


def test_a_die_with_the_mtp_module_drafts_verifies_and_keeps_the_greedy_tokens(die):
    prompt = TextTokenizer.load(MODEL).encode("def read_lines(path):\n    with open(path) as f:\n")
    want = list(generate(load_model(MODEL), prompt, SamplingParams(max_tokens=12), ignore_eos=True))

    async def scenario():
        async with NpuClient(die) as npu:
            loaded = await npu.load_model(str(MODEL), speculative_tokens=1, block_size=16)
            blocks = await npu.allocate_blocks(4)
            reply = await npu.forward(1, [_input("s", prompt, 0, blocks)])
            out, tokens, steps, phases = reply.outputs[0], [], 1, {}
            tokens.append(out.token_id)
            while len(tokens) < 12:
                draft = out.draft_token
                reply = await npu.forward(steps + 1, [_input("s", tokens[-1:], len(prompt) + len(tokens) - 1, [],
                                                             cached=True, draft_token=draft)])
                out, steps = reply.outputs[0], steps + 1
                tokens += [out.token_id] + ([out.bonus_token] if out.HasField("bonus_token") else [])
                phases = {p.phase: p.modeled_s for p in reply.timing.phases}
            kv = await npu.read_blocks([(blocks[0], 16)])
            return loaded, tokens[:12], steps, phases, kv

    loaded, tokens, steps, phases, kv = asyncio.run(scenario())
    assert tokens == want and steps < 12  # accepted drafts save steps, never change a token
    assert phases["mtp"] > 0 and phases["lm_head"] > 0
    cfg = load_model(MODEL).cfg
    assert kv[0].shape == (cfg.num_hidden_layers + 1, 16, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert loaded.kv_blocks_total > 0


BAD = [(dict(draft_token=5, skip_sampling=True, following_token=7), "sequences.draft_token"),  # drafts are verified
       (dict(skip_sampling=True), "sequences.following_token"),      # the MTP module reads the next token
       (dict(draft_token=10**6), "sequences.draft_token")]


def test_bad_draft_inputs_are_refused_by_field_and_the_die_serves_on(die):
    async def scenario():
        async with NpuClient(die) as npu:
            await npu.load_model(str(MODEL), speculative_tokens=1, block_size=16)
            blocks = await npu.allocate_blocks(1)
            errors = []
            for step, (extra, _) in enumerate(BAD, 1):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await npu.forward(step, [_input("bad", [3, 4, 5], 0, blocks, **extra)])
                errors.append(err.value)
            good = await npu.forward(len(BAD) + 1, [_input("good", [3, 4, 5], 0, blocks)])
            return errors, good

    errors, good = asyncio.run(scenario())
    for error, (_, field) in zip(errors, BAD):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.details()
    assert good.outputs[0].has_token and good.outputs[0].HasField("draft_token")


def test_speculation_needs_a_checkpoint_with_an_mtp_module(die, tiny_checkpoint):
    async def scenario():
        async with NpuClient(die) as npu:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await npu.load_model(str(tiny_checkpoint), speculative_tokens=1)
            await npu.load_model(str(tiny_checkpoint))  # without: loads
            blocks = await npu.allocate_blocks(1)
            with pytest.raises(grpc.aio.AioRpcError) as no_module:
                await npu.forward(1, [_input("d", [3, 4], 0, blocks, draft_token=5)])
            return err.value, no_module.value

    error, no_module = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "speculative_tokens" in error.details()
    assert no_module.code() == grpc.StatusCode.INVALID_ARGUMENT and "draft_token" in no_module.details()
