"""`cmx certs --out DIR`: a CA and a certificate per service for mutual TLS (docs/security.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cloudmatrix.rpc.tls import DEFAULT_HOSTS, SERVICE_IDENTITIES, make_certs


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("certs", help="make a CA and per-service certificates for mutual TLS")
    parser.add_argument("--out", required=True, help="directory for ca.pem / ca.key and <identity>.pem / .key")
    parser.add_argument("--hosts", default=",".join(DEFAULT_HOSTS),
                        help="comma-separated IPs and DNS names every certificate is valid for")
    parser.add_argument("--identities", default=",".join(SERVICE_IDENTITIES),
                        help="comma-separated identities: one certificate each")
    parser.add_argument("--force", action="store_true", help="replace an existing CA in --out")
    parser.set_defaults(handler=_certs)


def _certs(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "ca.pem").exists() and not args.force:
        raise ValueError(f"{out} already holds a CA (ca.pem); pass --force to replace it and every certificate")
    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    identities = tuple(i.strip() for i in args.identities.split(",") if i.strip())
    if not hosts or not identities:
        raise ValueError("--hosts and --identities must each name at least one entry")
    files = make_certs(out, hosts, identities)
    print(f"CA: {out / 'ca.pem'} (key {out / 'ca.key'}); valid for {', '.join(hosts)}")
    for identity, f in files.items():
        print(f"  {identity}: {f.cert}, {f.key}")
    print(f"serve with: --set server.tls_ca={out / 'ca.pem'} --set server.tls_cert={out}/<identity>.pem "
          f"--set server.tls_key={out}/<identity>.key")
    return 0
