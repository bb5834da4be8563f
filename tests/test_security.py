"""Security: `cmx certs` makes a CA and per-service certificates; a topology with `tls: true`
serves gRPC only to clients presenting a certificate of its CA (real processes); and the source
never unpickles, evals or execs anything (a scan). API keys: test_gateway.py (HTTP and gRPC);
prompts, completions and keys kept out of logs and spans: test_serving_e2e.py."""
from __future__ import annotations

import asyncio
import re
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from cloudmatrix.cli.main import main
from cloudmatrix.clients import ClientOptions, KvShardClient, Unavailable
from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.topology import parse_topology
from cloudmatrix.rpc.tls import TlsFiles, channel_credentials, make_certs, process_tls

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def test_cmx_certs_makes_a_ca_and_certificates_it_signed(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--hosts", "127.0.0.1,kvcache-0.kvcache", "--identities",
                 "kvcache,client"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    for identity in ("kvcache", "client"):
        cert = x509.load_pem_x509_certificate((out / f"{identity}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)  # raises when the CA did not sign it
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert "kvcache-0.kvcache" in san.get_values_for_type(x509.DNSName)
        assert stat.S_IMODE((out / f"{identity}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    assert main(["certs", "--out", str(out)]) == 2  # never overwrites a CA by accident
    assert "already holds a CA" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tls_shard(tmp_path_factory):
    """A real kvcache shard started by the launcher from a `tls: true` topology."""
    run_dir = tmp_path_factory.mktemp("tls-run")
    topology = parse_topology({"name": "tls", "tls": True, "services": [{"name": "kvcache", "service": "kvcache"}]},
                              Path("."))
    records = bring_up(topology, run_dir, 60.0)
    try:
        yield run_dir, records[0].address
    finally:
        bring_down(run_dir, grace_s=5.0)


def _stats(address: str, credentials: grpc.ChannelCredentials | None):
    async def call():
        async with KvShardClient(address, ClientOptions(credentials=credentials, retries=0, deadline_s=5)) as shard:
            return await shard.stats()

    return asyncio.run(call())


def test_mutual_tls_serves_a_client_with_a_certificate_of_the_ca_and_refuses_the_rest(tls_shard, tmp_path):
    run_dir, address = tls_shard
    assert process_tls() is None  # bring_up left this process's own channels as they were
    assert _stats(address, channel_credentials(TlsFiles.in_dir(run_dir / "certs", "client")))["capacity_bytes"] > 0
    other_ca = make_certs(tmp_path / "other")["client"]
    ca_only = grpc.ssl_channel_credentials(root_certificates=(run_dir / "certs" / "ca.pem").read_bytes())
    for refused in (None, channel_credentials(other_ca), ca_only):  # plaintext, a stranger, no certificate
        with pytest.raises(Unavailable):
            _stats(address, refused)


def test_the_cli_talks_to_a_tls_run_with_its_client_certificate(tls_shard):
    run_dir, _ = tls_shard
    status = subprocess.run([sys.executable, "-m", "cloudmatrix.cli.main", "status", "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "SERVING" in status.stdout, status.stdout + status.stderr
    call = subprocess.run([sys.executable, "-m", "cloudmatrix.cli.main", "call", "kvcache-0", "Stats",
                           "--run-dir", str(run_dir), "--emit-defaults"], capture_output=True, text=True, timeout=60)
    assert call.returncode == 0 and '"capacity_bytes"' in call.stdout, call.stderr


def test_a_half_configured_tls_server_is_a_config_error():
    from cloudmatrix.config import ServerConfig

    with pytest.raises(ValueError, match="tls_ca"):
        ServerConfig(tls_ca="ca.pem")


# Calls that turn bytes into code or objects: never on anything that arrives over the network.
FORBIDDEN = [re.compile(p) for p in (r"\bimport pickle\b", r"\bpickle\.", r"\bcPickle\b", r"\bmarshal\.loads\b",
                                     r"(?<![\w.])eval\(", r"(?<![\w.])exec\(", r"\byaml\.load\(",
                                     r"\byaml\.unsafe_load\b", r"\bshelve\.", r"\bdill\.")]
TORCH_LOAD = re.compile(r"\btorch\.load\(")


def test_no_pickle_eval_or_exec_anywhere_in_the_services_and_libraries():
    sources = [p for d in ("services", "libs/cloudmatrix") for p in (REPO / d).rglob("*.py")]
    assert len(sources) > 100
    found = []
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in FORBIDDEN) or (TORCH_LOAD.search(code) and "weights_only=True" not in code):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []
