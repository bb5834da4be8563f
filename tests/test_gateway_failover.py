"""The gateway core against a fake backend (milliseconds): an instance that answers UNAVAILABLE is
left out and the request moves to another instance; with none left, the instance's own message
reaches the client, without addresses."""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.rpc.errors import PeerUnavailable
from cloudmatrix.sampling_params import SamplingParams
from services.gateway.admission import Admission
from services.gateway.core import GatewayCore, ModelInfo
from services.gateway.picker import InstancePicker
from services.gateway.schema import DecodeStep, Finish, GenerateRequest, PrefillOutcome

DOWN = "decode-0: die 1 failed (UNAVAILABLE); the instance is recovering"


def _stages(token: int) -> list[PrefillOutcome]:
    """A prefill's two answers: the first token (no KV handle yet), then the outcome with it."""
    return [PrefillOutcome(token, None, 0, {}, {}, 0.0), PrefillOutcome(token, "kv", 0, {}, {}, 0.0)]


class FakeStream:
    def __init__(self, down: bool, tokens: list[int]) -> None:
        self.down, self.tokens = down, tokens

    async def __aiter__(self):
        if self.down:
            raise PeerUnavailable(DOWN)
        for i, token in enumerate(self.tokens):
            yield DecodeStep([token], "length" if i == len(self.tokens) - 1 else None, 0.0)

    async def close(self) -> None:
        pass


class FakeBackend:
    def __init__(self, down: set[str]) -> None:
        self.down, self.calls = down, []

    async def prefill(self, address, p, timeout_s):
        self.calls.append(address)
        if address in self.down:
            raise PeerUnavailable(DOWN.replace("decode", "prefill"))
        for outcome in _stages(5):
            yield outcome

    def decode(self, address, p, first, timeout_s):
        self.calls.append(address)
        return FakeStream(address in self.down, [6, 7])

    async def cancel(self, address, request_id, timeout_s):
        return True

    async def prefill_load(self, address, timeout_s):
        return 0

    async def decode_load(self, address, timeout_s):
        return 0


def _generate(tokenizer, down: set[str]):
    backend = FakeBackend(down)
    core = GatewayCore(ModelInfo("m", 2048, 1024, 1), tokenizer, backend,
                       InstancePicker("prefill", ("p0", "p1"), backend.prefill_load),
                       InstancePicker("decode", ("d0", "d1"), backend.decode_load), Admission(4, 4), 10.0)
    prepared = core.prepare(GenerateRequest("r", "m", [3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True)))

    async def run():
        return [event async for event in core.generate(prepared)]

    return backend, asyncio.run(run())


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return TextTokenizer.load(tiny_checkpoint)


def test_an_unavailable_instance_is_left_out_and_another_serves(tokenizer):
    backend, events = _generate(tokenizer, {"p0", "d0"})
    assert backend.calls == ["p0", "p1", "d0", "d1"]
    assert [t for e in events[:-1] for t in e.token_ids] == [5, 6, 7]
    assert isinstance(events[-1], Finish) and events[-1].reason == "length"


def _failed(reason: str) -> float:
    return REGISTRY.get_sample_value("cmx_requests_total", {"model_name": "m", "finish_reason": reason}) or 0.0


def test_with_every_instance_down_the_instance_message_reaches_the_client(tokenizer):
    before = _failed("unavailable")
    with pytest.raises(PeerUnavailable) as err:
        _generate(tokenizer, {"p0", "p1"})
    assert str(err.value) == DOWN.replace("decode", "prefill")
    with pytest.raises(PeerUnavailable, match="^decode-0: die 1 failed"):
        _generate(tokenizer, {"d0", "d1"})
    assert _failed("unavailable") - before == 2  # counted by kind, not as a bare "error"


def test_failures_are_counted_by_kind(tokenizer):
    class Failing(FakeBackend):
        def __init__(self, exc: Exception) -> None:
            super().__init__(set())
            self.exc = exc

        async def prefill(self, address, p, timeout_s):
            raise self.exc
            yield

    for exc, reason in ((TimeoutError("late"), "timeout"), (RuntimeError("boom"), "error")):
        backend = Failing(exc)
        core = GatewayCore(ModelInfo("m", 2048, 1024, 1), tokenizer, backend,
                           InstancePicker("prefill", ("p0",), backend.prefill_load),
                           InstancePicker("decode", ("d0",), backend.decode_load), Admission(4, 4), 10.0)
        prepared = core.prepare(GenerateRequest("r", "m", [3, 4], SamplingParams(max_tokens=2)))
        before = _failed(reason)

        async def run():
            return [event async for event in core.generate(prepared)]

        with pytest.raises(type(exc)):
            asyncio.run(run())
        assert _failed(reason) - before == 1


class PositionBackend(FakeBackend):
    """A model whose next token is the sequence's length: any split of the generation between
    instances gives the same tokens. Decode instances in ``dies_after`` fail after that many."""

    def __init__(self, dies_after: dict[str, int]) -> None:
        super().__init__(set())
        self.dies_after, self.prefills = dies_after, []

    async def prefill(self, address, p, timeout_s):
        self.prefills.append(len(p.token_ids))
        for outcome in _stages(len(p.token_ids)):
            yield outcome

    def decode(self, address, p, first, timeout_s):
        self.calls.append(address)
        return PositionStream(len(p.token_ids) + 1, p.sampling.max_tokens - 1, self.dies_after.get(address))


class PositionStream:
    def __init__(self, start: int, count: int, dies_after: int | None) -> None:
        self.start, self.count, self.dies_after = start, count, dies_after

    async def __aiter__(self):
        for i in range(self.count):
            if i == self.dies_after:
                raise PeerUnavailable("decode-0: the instance is gone")
            yield DecodeStep([self.start + i], "length" if i == self.count - 1 else None, 0.0)

    async def close(self) -> None:
        pass


def test_a_decode_instance_lost_mid_stream_hands_the_request_to_another_with_no_token_lost(tokenizer):
    backend = PositionBackend({"d0": 5})
    core = GatewayCore(ModelInfo("m", 2048, 1024, 1), tokenizer, backend,
                       InstancePicker("prefill", ("p0",), backend.prefill_load),
                       InstancePicker("decode", ("d0", "d1"), backend.decode_load), Admission(4, 4), 10.0)
    prompt = [3, 4, 5]
    prepared = core.prepare(GenerateRequest("r", "m", prompt, SamplingParams(max_tokens=12, ignore_eos=True)))
    before = REGISTRY.get_sample_value("cmx_request_migrations_total", {"model_name": "m"}) or 0.0

    async def run():
        return [event async for event in core.generate(prepared)]

    events = asyncio.run(run())
    tokens = [t for e in events[:-1] for t in e.token_ids]
    assert tokens == list(range(3, 15))  # 12 tokens, each once, in order
    assert events[-1].reason == "length" and events[-1].usage.completion_tokens == 12
    assert events[-1].usage.prompt_tokens == 3  # the client's prompt, not the continuation's
    # prefill of the prompt, then of the prompt + the 6 tokens streamed (1 + 5 from d0)
    assert backend.prefills == [3, 9] and backend.calls == ["d0", "d1"]
    assert REGISTRY.get_sample_value("cmx_request_migrations_total", {"model_name": "m"}) - before == 1


class LateHandoff(PositionBackend):
    """Prefill instances in ``lost`` answer the first token, then fail before the KV is in the
    pool (once each); every prefill's handoff waits for ``release``."""

    def __init__(self, lost: set[str]) -> None:
        super().__init__({})
        self.lost, self.release = lost, asyncio.Event()

    async def prefill(self, address, p, timeout_s):
        self.calls.append(address)
        self.prefills.append(len(p.token_ids))
        first, handoff = _stages(len(p.token_ids))
        yield first
        await self.release.wait()
        if address in self.lost:
            self.lost.discard(address)
            raise PeerUnavailable("prefill-0: the kvcache pool did not acknowledge the blocks")
        yield handoff


def _core(tokenizer, backend, prefills=("p0",)):
    return GatewayCore(ModelInfo("m", 2048, 1024, 1), tokenizer, backend,
                       InstancePicker("prefill", prefills, backend.prefill_load),
                       InstancePicker("decode", ("d0",), backend.decode_load), Admission(4, 4), 10.0)


def test_the_first_token_reaches_the_client_before_the_prompt_kv_is_in_the_pool(tokenizer):
    backend = LateHandoff(set())
    core = _core(tokenizer, backend)
    prepared = core.prepare(GenerateRequest("r", "m", [3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True)))

    async def run():
        events = []
        async for event in core.generate(prepared):
            if not events:  # the first token: the handoff has not happened, no decode was called
                assert event.token_ids == [3] and not backend.release.is_set() and backend.calls == ["p0"]
                backend.release.set()
            events.append(event)
        return events

    events = asyncio.run(run())
    assert [t for e in events[:-1] for t in e.token_ids] == [3, 4, 5, 6]
    assert backend.calls == ["p0", "d0"] and events[-1].reason == "length"
    assert "prefill" in events[-1].timing.measured  # the prefill's time runs to the handoff


def test_a_prefill_lost_after_its_first_token_continues_elsewhere_with_no_token_lost_or_repeated(tokenizer):
    backend = LateHandoff({"p0"})
    backend.release.set()
    core = _core(tokenizer, backend, ("p0", "p1"))
    prepared = core.prepare(GenerateRequest("r", "m", [3, 4, 5], SamplingParams(max_tokens=6, ignore_eos=True)))

    async def run():
        return [event async for event in core.generate(prepared)]

    events = asyncio.run(run())
    assert [t for e in events[:-1] for t in e.token_ids] == [3, 4, 5, 6, 7, 8]
    # the prompt on p0 (lost after its token 3), then the prompt + 3 as a continuation on p1
    assert backend.prefills == [3, 4] and backend.calls == ["p0", "p1", "d0"]
    assert events[-1].reason == "length" and events[-1].usage.completion_tokens == 6


def test_a_request_done_at_its_first_token_finishes_when_the_write_back_is_lost(tokenizer):
    backend = LateHandoff({"p0"})
    backend.release.set()
    core = _core(tokenizer, backend)
    prepared = core.prepare(GenerateRequest("r", "m", [3, 4, 5], SamplingParams(max_tokens=1)))

    async def run():
        return [event async for event in core.generate(prepared)]

    events = asyncio.run(run())
    assert [t for e in events[:-1] for t in e.token_ids] == [3]
    assert events[-1].reason == "length" and backend.calls == ["p0"]
