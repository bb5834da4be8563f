"""Instances found while the system runs (rpc/discovery.py): fixed addresses, a name's DNS records,
the launcher's ready files; the gateway's picker takes up instances that appear, stops picking the
ones that leave and retires their clients once no request of its own is left on them."""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from cloudmatrix.config import ConfigError, load_config
from cloudmatrix.launcher.processes import ProcessRecord
from cloudmatrix.launcher.topology import ProcessSpec
from cloudmatrix.launcher.waves import references, resolve
from cloudmatrix.rpc.discovery import Discovery, parse_sources
from cloudmatrix.rpc.errors import PeerUnavailable
from services.gateway.config import GatewayConfig
from services.gateway.picker import InstancePicker


def _ready(directory, name: str, port: int, host: str = "127.0.0.1") -> None:
    (directory / f"{name}.json").write_text(json.dumps({"service": "decode", "host": host, "port": port}))


def test_sources_keep_their_order_ranges_expand_and_bad_ones_are_refused_naming_the_field():
    assert parse_sources(["a:1", "d-{0..1}.d:2", "dns:///decode:50051", "ready:/run/ready/decode"], "decode") == (
        "a:1", "d-0.d:2", "d-1.d:2", "dns:///decode:50051", "ready:/run/ready/decode")
    for bad, needle in [("dns:///decode", "dns:///<name>:<port>"), ("dns:///:1", "dns:///<name>:<port>"),
                        ("ready:", "ready:<directory>/<entry name>"), ("ready:/run/", "ready:<directory>")]:
        with pytest.raises(ValueError, match=f"decode: .*{needle}"):
            parse_sources([bad], "decode")
    with pytest.raises(ValueError, match="listed twice"):
        parse_sources(["dns:///decode:1", "dns:///decode:1"], "decode")
    with pytest.raises(ConfigError, match="decode"):
        load_config(GatewayConfig, overrides=["checkpoint=x", "prefill=a:1", "decode=dns:///decode"])


def test_a_names_records_are_its_addresses():
    found = asyncio.run(Discovery(("dns:///localhost:50051",), "decode").resolve())
    assert "127.0.0.1:50051" in found or "[::1]:50051" in found
    assert all(a.endswith(":50051") for a in found)


def test_ready_files_give_the_entrys_serving_processes_in_index_order(tmp_path):
    ports = random.sample(range(20000, 30000), 3)
    _ready(tmp_path, "decode-10", ports[2])
    _ready(tmp_path, "decode-2", ports[0], host="::1")
    _ready(tmp_path, "decode-die-0", 1)           # another entry's process
    (tmp_path / "decode-0.http.json").write_text("{}")  # a gateway's HTTP port file
    (tmp_path / "decode-3.json").write_text("{")         # being written: skipped this round
    discovery = Discovery((f"ready:{tmp_path / 'decode'}", "fixed:9"), "decode")
    assert asyncio.run(discovery.resolve()) == (f"[::1]:{ports[0]}", f"127.0.0.1:{ports[2]}", "fixed:9")
    (tmp_path / "decode-10.json").unlink()  # its drain began
    _ready(tmp_path, "decode-3", ports[1])  # a process started later
    assert asyncio.run(discovery.resolve()) == (f"[::1]:{ports[0]}", f"127.0.0.1:{ports[1]}", "fixed:9")


def test_a_source_that_cannot_be_read_gives_its_last_answer_and_the_others_still_count(tmp_path):
    discovery = Discovery((f"ready:{tmp_path / 'gone' / 'decode'}", "fixed:9"), "decode")
    assert asyncio.run(discovery.resolve()) == ("fixed:9",)  # never read: nothing
    (tmp_path / "gone").mkdir()
    _ready(tmp_path / "gone", "decode-0", 7)
    (tmp_path / "gone" / "decode-1.json").write_text("[]")               # JSON, but no ready file
    (tmp_path / "gone" / "decode-2.json").write_text('{"host": "h"}')   # no port
    assert asyncio.run(discovery.resolve()) == ("127.0.0.1:7", "fixed:9")
    for child in (tmp_path / "gone").iterdir():
        child.unlink()
    (tmp_path / "gone").rmdir()  # a resolver's hiccup must not empty the list
    assert asyncio.run(discovery.resolve()) == ("127.0.0.1:7", "fixed:9")


def test_the_picker_takes_up_a_new_instance_and_retires_a_gone_one_once_its_requests_finished(tmp_path):
    async def main() -> None:
        loads = {"127.0.0.1:1": 3, "127.0.0.1:2": 0}
        retired: list[str] = []

        async def load(address: str, timeout_s: float) -> int:
            return loads[address]

        async def retire(address: str) -> None:
            retired.append(address)

        picker = InstancePicker("decode", (f"ready:{tmp_path / 'decode'}",), load, refresh_s=0.0, on_retire=retire)
        _ready(tmp_path, "decode-0", 1)
        assert await picker.pick() == "127.0.0.1:1"
        _ready(tmp_path, "decode-1", 2)  # started later, less loaded
        assert await picker.pick() == "127.0.0.1:2"
        with picker.using("127.0.0.1:1"):
            (tmp_path / "decode-0.json").unlink()  # draining, with one of our requests on it
            assert await picker.reachable() == ["127.0.0.1:2"]
            assert retired == []
        await picker.pick()
        assert retired == ["127.0.0.1:1"] and picker.in_flight == {}

    asyncio.run(main())


def test_the_launcher_gives_an_entry_s_endpoints_as_its_ready_files_and_starts_after_it(tmp_path):
    spec = ProcessSpec("gateway-0", "gateway", "127.0.0.1", 0, None, ("decode={endpoints:decode}",))
    assert references(spec) == {"decode"}
    records = [ProcessRecord("decode-0", "decode", 1, "log", str(tmp_path / "ready" / "decode-0.json"))]
    assert resolve(spec, records, tmp_path).overrides == (f"decode=ready:{tmp_path / 'ready' / 'decode'}",)


def test_with_no_instance_in_its_snapshot_the_picker_looks_again_at_once(tmp_path):
    """An instance that turned SERVING just after a snapshot that found none is picked by the next
    request, not after the next scheduled snapshot."""
    async def main() -> None:
        async def load(address: str, timeout_s: float) -> int:
            return 0

        picker = InstancePicker("decode", (f"ready:{tmp_path / 'decode'}",), load, refresh_s=3600.0)
        with pytest.raises(PeerUnavailable, match="no decode instance"):
            await picker.pick()
        _ready(tmp_path, "decode-0", 5)
        assert await picker.pick() == "127.0.0.1:5"

    asyncio.run(main())
