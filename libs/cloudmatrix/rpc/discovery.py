"""Instances found while the system runs, not listed once at start-up.

An address setting (the gateway's ``prefill`` and ``decode``) is a list of sources, each one of:

- ``host:port``, with an optional ``{first..last}`` range (rpc/addresses.py): fixed addresses; the
  ones that do not answer are left out by their user;
- ``dns:///<name>:<port>``: every address record of ``name`` with ``port``. In Kubernetes
  ``name`` is a headless Service, whose records are its ready pods: a pod the autoscaler adds
  appears once its readiness probe passes, and a pod being deleted leaves at once;
- ``ready:<dir>/<entry>``: the ready files ``<dir>/<entry>-<n>.json`` of the local launcher's
  processes (a process writes its file when it turns SERVING and removes it when its drain
  begins), so a process started or restarted later is found the same way.

``Discovery.resolve()`` reads every source again (its user calls it once per refresh, every second
or so). A source that cannot be read that round (a DNS server not answering within
``TIMEOUT_S``, a missing directory) gives what it gave last time, so a resolver's hiccup does not
empty the list; it is logged when it fails and when it recovers, not at every round.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from pathlib import Path

from cloudmatrix.rpc.addresses import expand_addresses

log = logging.getLogger(__name__)

DNS = "dns:///"
READY = "ready:"
TIMEOUT_S = 5.0
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


def parse_sources(specs: tuple[str, ...] | list[str], field: str) -> tuple[str, ...]:
    """The sources of an address setting, ranges expanded; ValueError naming ``field`` for a
    ``dns:`` source without ``name:port``, a ``ready:`` source without a path, or a repeat."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith(DNS) and not _HOST_PORT.match(spec[len(DNS):]):
            raise ValueError(f"{field}: {spec!r} must be dns:///<name>:<port>, e.g. dns:///decode:50051")
        if spec.startswith(READY) and (spec == READY or spec.endswith("/")):
            raise ValueError(f"{field}: {spec!r} must be ready:<directory>/<entry name>")
        out += [spec] if _dynamic(spec) else expand_addresses([spec], field)
    if len(set(out)) != len(out):
        raise ValueError(f"{field}: an address is listed twice in {', '.join(out)}")
    return tuple(out)


def _dynamic(spec: str) -> bool:
    return spec.startswith((DNS, READY))


def dynamic(sources: tuple[str, ...]) -> bool:
    """True when some source is read again at every resolve (dns:, ready:)."""
    return any(_dynamic(s) for s in sources)


class Discovery:
    """The current addresses of a list of sources (``parse_sources``), in source order."""

    def __init__(self, sources: tuple[str, ...], kind: str) -> None:
        self.sources, self.kind = sources, kind
        self._failing: set[str] = set()
        self._last: dict[str, list[str]] = {}  # each dynamic source's last answer

    @property
    def dynamic(self) -> bool:
        return dynamic(self.sources)

    async def resolve(self) -> tuple[str, ...]:
        found: list[str] = []
        for source in self.sources:
            if not _dynamic(source):
                found.append(source)
                continue
            try:
                read = _dns(source) if source.startswith(DNS) else asyncio.to_thread(_ready, source)
                addresses = await asyncio.wait_for(read, TIMEOUT_S)
            except (OSError, ValueError, asyncio.TimeoutError) as err:
                if source not in self._failing:
                    log.warning("cannot resolve instances; keeping the last answer",
                                extra={"kind": self.kind, "source": source, "error": str(err) or type(err).__name__,
                                       "last": self._last.get(source, [])})
                self._failing.add(source)
                found += self._last.get(source, [])
                continue
            self._last[source] = addresses
            if source in self._failing:
                log.info("instances resolve again", extra={"kind": self.kind, "source": source})
                self._failing.discard(source)
            found += addresses
        return tuple(dict.fromkeys(found))


async def _dns(source: str) -> list[str]:
    """Every address record of the name in ``dns:///<name>:<port>``, sorted (a resolver's order
    changes between rounds); none when the name has no record (a headless Service with no ready
    pod answers NXDOMAIN)."""
    host, port = _HOST_PORT.match(source[len(DNS):]).groups()
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        if err.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        raise
    ips = sorted({info[4][0] for info in infos})
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


def _ready(source: str) -> list[str]:
    """The addresses in the ready files ``<dir>/<entry>-<n>.json``, by n; a file being replaced
    or removed while read is skipped (it is back, or gone, at the next round)."""
    path = Path(source[len(READY):])
    pattern = re.compile(rf"^{re.escape(path.name)}-(\d+)\.json$")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such directory")
    found = []
    for child in path.parent.iterdir():
        match = pattern.match(child.name)
        if match is None:
            continue
        try:
            info = json.loads(child.read_text())
            host, port = str(info["host"]), int(info["port"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not a ready file
        found.append((int(match.group(1)), f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
    return [address for _, address in sorted(found)]
