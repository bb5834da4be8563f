"""Bundle frames on the wire and parcel payloads: what wire.py writes parses as a protobuf Frame,
what protobuf writes reads back through wire.py, and token rows survive the payload codec."""
from __future__ import annotations

import random

import pytest
import torch

from cloudmatrix.fabric.codec import from_payload, round_id, to_payload
from cloudmatrix.fabric.wire import WireError, read_bundle, write_bundle
from cloudmatrix.moe.dispatch import TokenRows
from cmx.fabric.v1 import fabric_pb2


def _random_payloads(rng: random.Random, peers: list[int]) -> dict[int, bytes]:
    # some empty (no rows for that peer), some longer than 127 bytes (multi-byte lengths)
    return {p: rng.randbytes(rng.choice([0, 1, 100, 300, 70000])) for p in peers}


@pytest.mark.parametrize("seed", range(5))
def test_written_bundles_parse_as_protobuf_frames(seed):
    rng = random.Random(seed)
    rid = round_id(rng.randrange(1 << 40), rng.randrange(100), rng.randrange(2), rng.choice(["dispatch", "combine"]))
    payloads = _random_payloads(rng, rng.sample(range(300), 5))
    pieces = [(p, [b[:7], b[7:]]) for p, b in payloads.items()]  # a payload may come in pieces
    raw = write_bundle(rid.SerializeToString(), "00-abc-def-01", pieces, src=3, dst=200)
    frame = fabric_pb2.Frame.FromString(raw)
    assert frame.WhichOneof("body") == "bundle" and frame.round == rid
    assert (frame.src_die, frame.dst_die, frame.traceparent) == (3, 200, "00-abc-def-01")
    assert {p.peer_die: p.payload for p in frame.bundle.parcels} == payloads


@pytest.mark.parametrize("seed", range(5))
def test_protobuf_frames_read_on_the_wire(seed):
    rng = random.Random(seed)
    rid = round_id(rng.randrange(1 << 40), rng.randrange(100), rng.randrange(2), "combine")
    payloads = _random_payloads(rng, [0, *rng.sample(range(1, 300), 4)])  # peer 0 is omitted on the wire
    frame = fabric_pb2.Frame(round=rid, traceparent="tp", bundle=fabric_pb2.Bundle(
        parcels=[fabric_pb2.Parcel(peer_die=p, payload=b) for p, b in payloads.items()]))
    bundle = read_bundle(frame.SerializeToString())
    assert bundle.round == rid and bundle.traceparent == "tp"
    assert {p: bytes(b) for p, b in bundle.parcels} == payloads


def test_frames_that_are_not_bundles_and_broken_bytes():
    hello = fabric_pb2.Frame(src_die=1, hello=fabric_pb2.Hello(die_id=1, world_size=2, group="g"))
    assert read_bundle(hello.SerializeToString()) is None
    raw = write_bundle(round_id(1, 2, 0, "dispatch").SerializeToString(), "", [(1, [b"x" * 200])])
    for cut in (len(raw) - 1, 5, 1):
        with pytest.raises(WireError):
            read_bundle(raw[:cut])


def _rows(n: int, dim: int, dtype: torch.dtype, scales: bool) -> TokenRows:
    hidden = torch.randint(-127, 128, (n, dim), dtype=torch.int8) if dtype == torch.int8 \
        else torch.randn(n, dim).to(dtype)
    return TokenRows(hidden, torch.randint(0, 1 << 20, (n,), dtype=torch.int32),
                     torch.randint(0, 256, (n,), dtype=torch.int32), torch.rand(n),
                     torch.rand(n) if scales else None)


@pytest.mark.parametrize("n,dim,dtype,scales", [(1, 7, torch.int8, True), (33, 256, torch.int8, True),
                                                (5, 64, torch.bfloat16, False), (17, 3, torch.float32, False),
                                                (2, 10, torch.float16, False)])
def test_token_rows_survive_the_payload_codec(n, dim, dtype, scales):
    rows = _rows(n, dim, dtype, scales)
    payload = b"".join(to_payload(rows))
    got = from_payload(payload, src=2)
    for name in ("hidden", "token_index", "expert_ids", "weights", "scales"):
        want, have = getattr(rows, name), getattr(got, name)
        assert (want is None and have is None) or (have.dtype == want.dtype and torch.equal(have, want)), name
    got.hidden.add_(1)  # decoded tensors are writable


def test_empty_rows_are_an_empty_payload():
    assert to_payload(None) == [] and from_payload(b"", 1) is None
    assert to_payload(_rows(0, 8, torch.int8, True)) == []


def test_malformed_payloads_are_clear_errors():
    payload = b"".join(to_payload(_rows(4, 16, torch.int8, True)))
    with pytest.raises(ValueError, match="shorter than the payload header"):
        from_payload(payload[:10], 3)
    with pytest.raises(ValueError, match="parcel from die 3: .* bytes, but 4 rows"):
        from_payload(payload[:-4], 3)
    with pytest.raises(ValueError, match="version 9"):
        from_payload(b"\x09" + payload[1:], 3)
    huge = bytearray(payload)
    huge[4:8] = (1 << 31).to_bytes(4, "little")  # claims 2^31 rows
    with pytest.raises(ValueError, match="rows"):
        from_payload(bytes(huge), 3)
