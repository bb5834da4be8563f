"""Start order from references: an override may name the addresses of another entry's processes,
``{addresses:<entry name>}`` (comma-joined, in process order), or the entry's processes as they
come and go, ``{endpoints:<entry name>}`` (``ready:<run_dir>/ready/<entry>``: the ready files of
the entry's SERVING processes, read again while the user runs, rpc/discovery.py). A process starts
once every entry it references is SERVING, so a topology starts in waves (e.g. shards and dies,
then the instances driving them, then the gateway)."""
from __future__ import annotations

import re
from pathlib import Path

from cloudmatrix.launcher.processes import ProcessRecord, ready_dir
from cloudmatrix.launcher.topology import ProcessSpec

_REF = re.compile(r"\{(addresses|endpoints):([A-Za-z0-9_.-]+)\}")


def entry_of(process_name: str) -> str:
    """'prefill-die-1' -> 'prefill-die' (processes are named <entry>-<index>)."""
    return process_name.rsplit("-", 1)[0]


def referenced_entries(value: str) -> list[str]:
    """The entries a setting's value names with {addresses:<entry>}."""
    return [entry for _, entry in _REF.findall(value)]


def references(spec: ProcessSpec) -> set[str]:
    """The entries ``spec`` waits for: every one it names, but its own entry's endpoints (a
    kvcache shard finds its peers, itself included, as they come)."""
    own = entry_of(spec.name)
    return {entry for o in spec.overrides for kind, entry in _REF.findall(o)
            if not (kind == "endpoints" and entry == own)}


def waves(processes: tuple[ProcessSpec, ...]) -> list[list[ProcessSpec]]:
    """Group processes so each wave only references entries started in earlier waves."""
    entries = {entry_of(p.name) for p in processes}
    for p in processes:
        unknown = references(p) - entries
        if unknown:
            raise ValueError(f"{p.name}: references unknown entries {sorted(unknown)}")
    done: set[str] = set()
    remaining, out = list(processes), []
    while remaining:
        wave = [p for p in remaining if references(p) <= done]
        if not wave:
            raise ValueError(f"topology references form a cycle among {sorted({entry_of(p.name) for p in remaining})}")
        out.append(wave)
        remaining = [p for p in remaining if p not in wave]
        done |= {entry_of(p.name) for p in wave} - {entry_of(p.name) for p in remaining}
    return out


def resolve(spec: ProcessSpec, records: list[ProcessRecord], run_dir: Path | None = None) -> ProcessSpec:
    """Replace every {addresses:X} by the addresses of entry X's running processes, and every
    {endpoints:X} by the source that finds X's SERVING processes from their ready files."""
    def addresses(match: re.Match) -> str:
        if match.group(1) == "endpoints":
            if run_dir is None:
                raise ValueError(f"{spec.name}: {{endpoints:{match.group(2)}}} needs the run directory")
            return f"ready:{ready_dir(run_dir) / match.group(2)}"
        return ",".join(r.address for r in records if entry_of(r.name) == match.group(2))
    overrides = tuple(_REF.sub(addresses, o) for o in spec.overrides)
    return ProcessSpec(spec.name, spec.service, spec.host, spec.port, spec.config, overrides)
