"""`cmx call` against live kvcache and ub_fabric processes: listing, describing, unary, client- and
server-streaming calls through reflection alone, name resolution through a run dir, and the exit
codes of every kind of failure."""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from cloudmatrix.cli.call_cmd import find_method
from cloudmatrix.cli.main import main
from cloudmatrix.launcher.processes import save_state
from cloudmatrix.launcher.topology import Topology
from cloudmatrix.rpc.tensor_codec import encode_tensor
from cmx.decode.v1 import decode_pb2
from cmx.prefill.v1 import prefill_pb2
from tests.services import running_services

REPO = Path(__file__).resolve().parents[1]
KV = "cmx.kvcache.v1.KvCacheShard"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir with kvcache-0 and fabric-0 SERVING and a state file like `cmx up` writes."""
    run_dir = tmp_path_factory.mktemp("call")
    specs = [("kvcache-0", "kvcache", (f"disk_dir={run_dir / 'disk'}",)), ("fabric-0", "ub_fabric", ())]
    with running_services(run_dir, specs) as records:
        save_state(run_dir, Topology("call-test", ()), list(records.values()))
        yield run_dir, records


def cmx_call(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["call", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def kv_address(run) -> str:
    return run[1]["kvcache-0"].address


def block_json(seed: int) -> dict:
    data = encode_tensor(torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(seed))).SerializeToString()
    key = hashlib.blake2b(f"call-{seed}".encode(), digest_size=16).digest()
    return {"key": base64.b64encode(key).decode(), "namespace": "tiny/fp32", "kind": "BLOCK_KIND_FULL",
            "num_tokens": 4, "data": base64.b64encode(data).decode(), "checksum": zlib.crc32(data)}


def test_list_shows_services_methods_and_streaming(run, capsys):
    code, out, _ = cmx_call(capsys, kv_address(run), "--list")
    assert code == 0
    assert f"{KV}\n" in out and "grpc.health.v1.Health" in out
    assert "rpc Put(stream cmx.kvcache.v1.PutBlock) returns (cmx.kvcache.v1.PutReply)" in out
    assert "rpc Get(cmx.kvcache.v1.GetRequest) returns (stream cmx.kvcache.v1.GetReply)" in out
    assert "rpc Stats(cmx.kvcache.v1.StatsRequest) returns (cmx.kvcache.v1.StatsReply)" in out


def test_describe_prints_request_fields(run, capsys):
    code, out, _ = cmx_call(capsys, kv_address(run), "Put", "--describe")
    assert code == 0
    assert out.splitlines()[0] == "message cmx.kvcache.v1.PutBlock {"
    assert "  bytes key = 1;" in out and "  fixed32 checksum = 6;" in out
    assert "cmx.common.v1.BlockKind kind = 3;  // BLOCK_KIND_UNSPECIFIED, BLOCK_KIND_FULL" in out


@pytest.mark.parametrize("method", [f"{KV}/Stats", "KvCacheShard/Stats", "Stats"])
def test_unary_call_in_every_method_form(run, capsys, method):
    code, out, _ = cmx_call(capsys, kv_address(run), method, "--emit-defaults")
    assert code == 0
    stats = json.loads(out)
    assert int(stats["capacity_bytes"]) > 0 and "checksum_failures" in stats
    assert out.startswith("{\n  ")  # one indented object


def test_fabric_stats_through_process_and_service_names(run, capsys):
    run_dir, _ = run
    for target in ("fabric-0", "fabric", "ub_fabric"):
        code, out, _ = cmx_call(capsys, target, "UbFabric/Stats", "--json", '{"reset": false}', "--emit-defaults",
                                "--run-dir", str(run_dir))
        assert code == 0, target
        assert json.loads(out) == {"links": [], "rounds_completed": "0", "attached_dies": 0}


def test_kvcache_name_resolves_to_its_first_process(run, capsys):
    run_dir, _ = run
    for target in ("kvcache-0", "kvcache"):
        code, out, _ = cmx_call(capsys, target, "Stats", "--run-dir", str(run_dir))
        assert code == 0 and "capacity_bytes" in json.loads(out)
    code, _, err = cmx_call(capsys, "decode-0", "Stats", "--run-dir", str(run_dir))
    assert code == 2 and "no process or service 'decode-0'" in err and "kvcache-0, fabric-0" in err


def test_put_then_get_round_trips_through_streaming_calls(run, capsys, tmp_path):
    blocks = [block_json(1), block_json(2)]
    request_file = tmp_path / "put.json"
    request_file.write_text(json.dumps(blocks))
    code, out, _ = cmx_call(capsys, kv_address(run), "Put", "--json", f"@{request_file}")
    assert code == 0
    assert json.loads(out)["stored"] == 2

    missing = base64.b64encode(bytes(16)).decode()
    keys = [blocks[1]["key"], missing, blocks[0]["key"]]
    code, out, _ = cmx_call(capsys, kv_address(run), "Get", "--json", json.dumps({"keys": keys}))
    assert code == 0
    replies = [json.loads(line) for line in out.splitlines()]  # one object per line
    assert [r["key"] for r in replies] == keys
    assert [r.get("found", False) for r in replies] == [True, False, True]
    assert replies[0]["data"] == blocks[1]["data"] and replies[2]["checksum"] == blocks[0]["checksum"]


def test_client_streaming_wants_a_list(run, capsys):
    code, _, err = cmx_call(capsys, kv_address(run), "Put", "--json", json.dumps(block_json(3)))
    assert code == 2 and "client-streaming" in err and "JSON list" in err


def test_bad_field_names_the_field(run, capsys):
    code, out, err = cmx_call(capsys, kv_address(run), "Lookup", "--json", '{"kees": []}')
    assert (code, out) == (2, "")
    assert err.startswith("cmx call: --json: ") and '"kees"' in err and len(err.strip().splitlines()) == 1
    code, _, err = cmx_call(capsys, kv_address(run), "Put", "--json", '[{}, {"num_tokens": "four"}]')
    assert code == 2 and "--json[1]" in err and "num_tokens" in err


def test_unknown_method_lists_what_exists(run, capsys):
    code, _, err = cmx_call(capsys, kv_address(run), "Generate")
    assert code == 2 and "no method 'Generate'" in err and f"{KV}/Stats" in err
    code, _, err = cmx_call(capsys, kv_address(run), "Gateway/Stats")
    assert code == 2 and "no method 'Gateway/Stats'" in err


def test_rpc_error_prints_code_and_details(run, capsys):
    too_short = base64.b64encode(b"abc").decode()
    code, out, err = cmx_call(capsys, kv_address(run), "Lookup", "--json", json.dumps({"keys": [too_short]}))
    assert (code, out) == (1, "")
    assert err.startswith("INVALID_ARGUMENT: ") and "16 bytes" in err


def test_unreachable_address(capsys):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = cmx_call(capsys, f"127.0.0.1:{port}", "Stats", "--timeout", "5")
    assert code == 1 and f"cannot reach 127.0.0.1:{port}" in err and "UNAVAILABLE" in err


def test_usage_errors(run, capsys):
    assert cmx_call(capsys, kv_address(run))[0] == 2  # neither METHOD nor --list
    code, _, err = cmx_call(capsys, kv_address(run), "Stats", "--metadata", "no-equals-sign")
    assert code == 2 and "KEY=VALUE" in err
    assert cmx_call(capsys, kv_address(run), "Stats", "--metadata", "x-cmx-test=1")[0] == 0


def test_short_method_ambiguous_across_services():
    services = [prefill_pb2.DESCRIPTOR.services_by_name["Prefill"], decode_pb2.DESCRIPTOR.services_by_name["Decode"]]
    with pytest.raises(ValueError, match="ambiguous.*cmx.prefill.v1.Prefill/GetLoad.*name the service"):
        find_method(services, "GetLoad", "here")
    assert find_method(services, "Decode/GetLoad", "here").containing_service.name == "Decode"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["call", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 10.0)" in out and "(default: {})" in out and "(default: runs/local)" in out


def test_subprocess_reads_json_from_stdin(run):
    run_dir, _ = run
    proc = subprocess.run([sys.executable, "-m", "cloudmatrix.cli.main", "call", "kvcache-0", "Lookup",
                           "--json", "-", "--run-dir", str(run_dir)],
                          input=json.dumps({"keys": [block_json(9)["key"]]}), capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"present": [False]}
