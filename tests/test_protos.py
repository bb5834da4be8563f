"""The generated gRPC code is fresh, and every service module declares its service."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "libs" / "cmx"
STALE_HINT = "generated code under libs/cmx is stale: run `make protos` and commit the result"

# module -> {service: rpcs it must have (more may be added)}
SERVICES = {
    "common": {},
    "npu": {
        "NpuEmulator": {
            "GetDieInfo", "LoadModel", "AllocateBlocks", "WriteBlocks", "ReadBlocks",
            "FreeBlocks", "Forward", "RunKernel", "GetExpertLoad",
        },
    },
    "fabric": {"UbFabric": {"Attach", "Stats", "Waiting"}},
    "kvcache": {
        "KvCacheShard": {
            "Put", "Get", "Lookup", "Lease", "Release", "Delete", "Stats", "PutBlob", "GetBlob",
        },
    },
    "prefill": {"Prefill": {"Prefill", "PrefillStream", "GetLoad"}},
    "decode": {"Decode": {"Decode", "Cancel", "GetLoad"}},
    "gateway": {"Gateway": {"Generate", "ListModels"}},
}


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("gen")
    cmd = [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return _files(out / "cmx")


def test_generated_code_is_not_stale(fresh):
    committed = _files(COMMITTED)
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    changed = sorted(k for k in fresh.keys() & committed.keys() if fresh[k] != committed[k])
    assert not missing, f"{STALE_HINT} (missing: {missing})"
    assert not extra, f"{STALE_HINT} (not generated from any .proto: {extra})"
    assert not changed, f"{STALE_HINT} (differs: {changed})"


def test_every_package_has_init(fresh):
    dirs = {str(Path(name).parent) for name in fresh}
    for d in dirs:
        prefix = "" if d == "." else f"{d}/"
        assert f"{prefix}__init__.py" in fresh, f"no __init__.py in generated dir {d}"


@pytest.mark.parametrize("svc", sorted(SERVICES))
def test_service_module_declares_services(svc):
    pb2 = importlib.import_module(f"cmx.{svc}.v1.{svc}_pb2")
    grpc_mod = importlib.import_module(f"cmx.{svc}.v1.{svc}_pb2_grpc")
    assert pb2.DESCRIPTOR.package == f"cmx.{svc}.v1"
    assert set(pb2.DESCRIPTOR.services_by_name) == set(SERVICES[svc])
    for name, rpcs in SERVICES[svc].items():
        methods = set(pb2.DESCRIPTOR.services_by_name[name].methods_by_name)
        assert rpcs <= methods, f"{name} lacks {sorted(rpcs - methods)}"
        for attr in (f"{name}Stub", f"{name}Servicer", f"add_{name}Servicer_to_server"):
            assert hasattr(grpc_mod, attr), f"cmx.{svc}.v1.{svc}_pb2_grpc has no {attr}"


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()  # DType -> DTYPE


@pytest.mark.parametrize("svc", sorted(SERVICES))
def test_enums_are_prefixed_and_start_unspecified(svc):
    pb2 = importlib.import_module(f"cmx.{svc}.v1.{svc}_pb2")
    for enum in pb2.DESCRIPTOR.enum_types_by_name.values():
        prefix = _upper_snake(enum.name) + "_"
        assert enum.values_by_number[0].name == f"{prefix}UNSPECIFIED", enum.name
        for value in enum.values:
            assert value.name.startswith(prefix), f"{enum.name}.{value.name} lacks {prefix}"
