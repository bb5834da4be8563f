"""Topology files: which service processes a local deployment runs, how many, on which ports."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

SERVICES = ("npu_emulator", "ub_fabric", "kvcache", "prefill", "decode", "gateway")
RESTART_POLICIES = ("never", "on-failure")


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """One process to start: ``python -m services.<service>`` with its config and overrides."""

    name: str
    service: str
    host: str
    port: int  # 0 = let the process pick a free port (it reports it in its ready file)
    config: str | None
    overrides: tuple[str, ...]
    restart: str = "never"  # "on-failure": the run's supervisor restarts it when it dies
    max_restarts: int = 5


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    processes: tuple[ProcessSpec, ...]
    otlp_endpoint: str | None = None  # every process also exports its spans to this OTLP collector
    tls: bool = False  # mutual TLS on every gRPC plane, with certificates `cmx up` makes per run

    def with_otlp_endpoint(self, endpoint: str | None) -> Topology:
        """The same processes, each exporting spans to the OTLP gRPC collector at ``endpoint``
        (``host:port``, or ``https://host:port`` for TLS) besides its span file; a process's own
        ``set: {server.otlp_endpoint: ...}`` still wins."""
        if not endpoint:
            return self
        setting = f"server.otlp_endpoint={_checked_endpoint(endpoint, 'otlp_endpoint')}"
        processes = tuple(dataclasses.replace(p, overrides=(setting, *p.overrides)) for p in self.processes)
        return dataclasses.replace(self, processes=processes, otlp_endpoint=endpoint)

    def with_certificates(self, cert_dir: Path) -> Topology:
        """Every process serves and calls with mutual TLS: its service type's certificate from
        ``cert_dir`` (``rpc.tls.make_certs``)."""
        def tls_settings(service: str) -> tuple[str, ...]:
            files = {"ca": cert_dir / "ca.pem", "cert": cert_dir / f"{service}.pem", "key": cert_dir / f"{service}.key"}
            return tuple(f"server.tls_{k}={v}" for k, v in files.items())

        processes = tuple(dataclasses.replace(p, overrides=(*tls_settings(p.service), *p.overrides))
                          for p in self.processes)
        return dataclasses.replace(self, processes=processes, tls=True)


def _checked_endpoint(endpoint: Any, where: str) -> str:
    if not isinstance(endpoint, str) or ":" not in endpoint or any(c.isspace() for c in endpoint):
        raise ValueError(f"{where}: expected host:port of an OTLP gRPC collector, got {endpoint!r}")
    return endpoint


def _require(entry: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind):
        raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _expand(entry: dict[str, Any], where: str, base_dir: Path) -> list[ProcessSpec]:
    service = _require(entry, "service", str, where)
    if service not in SERVICES:
        raise ValueError(f"{where}.service: unknown service {service!r}; known: {', '.join(SERVICES)}")
    name = entry.get("name", service)
    count = entry.get("count", 1)
    port = entry.get("port", 0)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}.count: expected a positive int, got {count!r}")
    if not isinstance(port, int) or not 0 <= port <= 65535 - count:
        raise ValueError(f"{where}.port: expected 0 (any free port) or a base port, got {port!r}")
    restart = entry.get("restart", "never")
    if restart not in RESTART_POLICIES:
        raise ValueError(f"{where}.restart: expected one of {', '.join(RESTART_POLICIES)}, got {restart!r}")
    max_restarts = entry.get("max_restarts", 5)
    if not isinstance(max_restarts, int) or max_restarts < 1:
        raise ValueError(f"{where}.max_restarts: expected a positive int, got {max_restarts!r}")
    config = _config_path(entry, base_dir)
    return [
        ProcessSpec(f"{name}-{i}", service, entry.get("host", "127.0.0.1"), port + i if port else 0, config,
                    _overrides(entry, i), restart, max_restarts)
        for i in range(count)
    ]


def _config_path(entry: dict[str, Any], base_dir: Path) -> str | None:
    config = entry.get("config")
    return str((base_dir / config).resolve()) if config else None


def _overrides(entry: dict[str, Any], index: int) -> tuple[str, ...]:
    """Process ``index``'s ``--set`` overrides: the entry's ``set``, then ``set_each`` with {index}."""
    return (tuple(f"{k}={v}" for k, v in (entry.get("set") or {}).items())
            + tuple(o.replace("{index}", str(index)) for o in entry.get("set_each", ())))


def parse_topology(raw: dict[str, Any], base_dir: Path) -> Topology:
    entries = raw.get("services")
    if not isinstance(entries, list) or not entries:
        raise ValueError("topology.services: expected a non-empty list")
    processes = [p for i, e in enumerate(entries) for p in _expand(e, f"services[{i}]", base_dir)]
    names = [p.name for p in processes]
    if len(set(names)) != len(names):
        raise ValueError(f"topology.services: process names repeat: {sorted(names)}")
    tls = raw.get("tls", False)
    if not isinstance(tls, bool):
        raise ValueError(f"topology.tls: expected true or false, got {tls!r}")
    topology = Topology(str(raw.get("name", "local")), tuple(processes), tls=tls)
    endpoint = raw.get("otlp_endpoint")
    return topology.with_otlp_endpoint(_checked_endpoint(endpoint, "topology.otlp_endpoint")) \
        if endpoint is not None else topology


def load_topology(path: str | Path) -> Topology:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"topology file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"topology file {path}: expected a mapping at the top level")
    return parse_topology(raw, path.parent)


_LAUNCHER_ONLY = re.compile(r"\{((?:addresses|endpoints):[^}]*|run_dir)\}")


def entry_settings(path: str | Path, entry: str, index: int, service: str) -> tuple[str | None, tuple[str, ...]]:
    """The config file and overrides topology file ``path`` gives process ``index`` of its entry
    ``entry``, for a process started by something other than `cmx up` (a Kubernetes container,
    its pod ordinal as ``index``, any index: an autoscaler may run more than ``count``).

    The file is checked whole first. ``service`` must be the entry's; the topology's
    ``otlp_endpoint`` applies. `cmx up`'s own placeholders ({addresses:...}, {endpoints:...}, {run_dir}) and
    ``tls: true`` (certificates `cmx up` makes) are refused: give addresses and files instead."""
    path = Path(path)
    topology = load_topology(path)
    raw = yaml.safe_load(path.read_text())
    where = f"topology file {path}"
    found = [e for e in raw["services"] if e.get("name", e.get("service")) == entry]
    if not found:
        names = ", ".join(e.get("name", e.get("service")) for e in raw["services"])
        raise ValueError(f"{where}: no entry named {entry!r} (entries: {names})")
    if found[0]["service"] != service:
        raise ValueError(f"{where}: entry {entry!r} runs service {found[0]['service']!r}, not {service!r}")
    if topology.tls:
        raise ValueError(f"{where}: tls: true is for `cmx up`, which makes the certificates; set "
                         "server.tls_ca, server.tls_cert and server.tls_key to mounted files instead")
    if index < 0:
        raise ValueError(f"{where}: index must be >= 0, got {index}")
    overrides = _overrides(found[0], index)
    for override in overrides:
        if _LAUNCHER_ONLY.search(override):
            raise ValueError(f"{where}: entry {entry!r} sets {override!r}; only `cmx up` fills in "
                             f"{_LAUNCHER_ONLY.search(override).group(0)}: write the value itself")
    if topology.otlp_endpoint:
        overrides = (f"server.otlp_endpoint={topology.otlp_endpoint}", *overrides)
    return _config_path(found[0], path.parent), overrides
