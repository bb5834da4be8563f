"""Address lists with {first..last} ranges (rpc/addresses.py), and the settings that take them."""
from __future__ import annotations

import pytest

from cloudmatrix.config import ConfigError, load_config
from cloudmatrix.rpc.addresses import expand_addresses
from services.decode.config import DecodeConfig
from services.gateway.config import GatewayConfig


def test_a_range_stands_for_every_number_in_it_in_order():
    assert expand_addresses(["kvcache-{0..2}.kvcache:50051"], "kvcache") == (
        "kvcache-0.kvcache:50051", "kvcache-1.kvcache:50051", "kvcache-2.kvcache:50051")
    assert expand_addresses(["a:1", "localhost:{50061..50062}", "b:2"], "dies") == (
        "a:1", "localhost:50061", "localhost:50062", "b:2")
    assert expand_addresses(["x-{3..3}:1"], "f") == ("x-3:1",)
    assert expand_addresses([], "f") == ()


@pytest.mark.parametrize("address, needle", [
    ("x-{2..1}:1", "must go up"),
    ("x-{0..5000}:1", "at most 1024"),
    ("x-{0..1}.{0..1}:1", "more than one"),
])
def test_a_bad_range_is_refused_naming_the_field(address, needle):
    with pytest.raises(ValueError, match=f"decode: .*{needle}"):
        expand_addresses([address], "decode")


def test_an_address_listed_twice_is_refused():
    with pytest.raises(ValueError, match="listed twice"):
        expand_addresses(["d-{0..1}:1", "d-1:1"], "decode")


def test_the_gateway_and_the_instances_expand_their_address_settings(tmp_path):
    config = load_config(GatewayConfig, overrides=["checkpoint=/m", "prefill=p-{0..1}.p:1", "decode=d-{0..3}.d:1"])
    assert config.prefill == ("p-0.p:1", "p-1.p:1") and len(config.decode) == 4
    with pytest.raises(ConfigError, match="decode"):
        load_config(GatewayConfig, overrides=["checkpoint=/m", "prefill=p:1", "decode=d-{3..0}:1"])
    decode = load_config(DecodeConfig, overrides=["checkpoint=/m", "dies=localhost:{7..8}", "fabric=f:1",
                                                   "kvcache=kv-{0..2}.kv:1"])
    assert decode.dies == ("localhost:7", "localhost:8") and decode.kvcache[2] == "kv-2.kv:1"
