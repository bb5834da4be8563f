"""Mutual TLS for every gRPC plane: a CA, a certificate per service, and the process-wide setting
that every channel this process opens follows.

``make_certs`` writes a run's CA and certificates (what `cmx certs` and `cmx up` with
``tls: true`` call). A service process with ``server.tls_*`` set serves only clients presenting a
certificate of that CA, and its own outbound channels present its certificate
(``use_process_tls``); `cmx` commands that talk to a TLS run use the run's ``client`` certificate.
"""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_IDENTITIES = ("gateway", "prefill", "decode", "npu_emulator", "ub_fabric", "kvcache", "client")
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA's certificate, and one identity's certificate and private key."""

    ca: str
    cert: str
    key: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return Path(self.ca).read_bytes(), Path(self.cert).read_bytes(), Path(self.key).read_bytes()
        except OSError as err:
            raise ValueError(f"TLS file unreadable: {err}") from err

    @classmethod
    def in_dir(cls, cert_dir: Path | str, identity: str) -> TlsFiles:
        d = Path(cert_dir)
        return cls(str(d / "ca.pem"), str(d / f"{identity}.pem"), str(d / f"{identity}.key"))


def files_of(server: Any) -> TlsFiles | None:
    """A ``ServerConfig``'s mutual-TLS identity (``tls_ca`` / ``tls_cert`` / ``tls_key``), or None."""
    return TlsFiles(server.tls_ca, server.tls_cert, server.tls_key) if server.tls_ca else None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Serve with ``files``' certificate; refuse clients without a certificate of the CA."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Trust only the CA; present ``files``' certificate."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


_process_files: TlsFiles | None = None
_process_credentials: grpc.ChannelCredentials | None = None


def use_process_tls(files: TlsFiles | None) -> None:
    """Every channel this process opens from now on (``rpc.channel``) presents ``files``' identity;
    None = plaintext."""
    global _process_files, _process_credentials
    _process_files = files
    _process_credentials = channel_credentials(files) if files else None


def process_channel_credentials() -> grpc.ChannelCredentials | None:
    return _process_credentials


def process_tls() -> TlsFiles | None:
    return _process_files


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cloudmatrix-infer"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _san(hosts: tuple[str, ...], identity: str) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in (*hosts, identity.replace("_", "-")):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
                 signer: ec.EllipticCurvePrivateKey, extensions: list[tuple[x509.ExtensionType, bool]]
                 ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def make_certs(out: Path | str, hosts: tuple[str, ...] = DEFAULT_HOSTS,
               identities: tuple[str, ...] = SERVICE_IDENTITIES) -> dict[str, TlsFiles]:
    """A new CA in ``out`` (ca.pem, ca.key) and, per identity, ``<identity>.pem`` / ``.key``
    signed by it, valid as server and client for ``hosts`` (IPs or DNS names) and the identity's
    own name. ECDSA P-256; keys are written owner-readable only."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("cloudmatrix-infer CA", _name("cloudmatrix-infer CA"), ca_key, ca_key,
                           [(x509.BasicConstraints(ca=True, path_length=0), True)])
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", ca_key)
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {}
    for identity in identities:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(identity, ca_cert.subject, key, ca_key,
                            [(x509.BasicConstraints(ca=False, path_length=None), True),
                             (_san(hosts, identity), False), (usage, False)])
        (out / f"{identity}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(out / f"{identity}.key", key)
        files[identity] = TlsFiles.in_dir(out, identity)
    return files
