"""CPU accounting for the serving benchmarks: CPU-seconds per output token of each kind of process
of a topology `cmx up` started, read from /proc (user + system time of every thread).

Kinds: the gateway, the prefill and decode services, the dies each of them drives, the fabric and
the kvcache shards. A die's instance comes from the topology's specs (``dies={addresses:<entry>}``
or literal ``host:port`` addresses, as the launcher resolves them).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

from cloudmatrix.allocator import MMAP_THRESHOLD_MAX
from cloudmatrix.config import ServerConfig
from cloudmatrix.launcher.processes import ProcessRecord, load_specs, load_state
from cloudmatrix.launcher.topology import ProcessSpec
from cloudmatrix.launcher.waves import entry_of, referenced_entries

KINDS = ("gateway", "prefill", "prefill dies", "decode", "decode dies", "fabric", "kvcache")
DIE_KINDS = ("prefill dies", "decode dies", "dies")
_SERVICE_KIND = {"gateway": "gateway", "prefill": "prefill", "decode": "decode", "ub_fabric": "fabric",
                 "kvcache": "kvcache", "npu_emulator": "dies"}
_ALLOCATOR_ENV = re.compile(r"^(MALLOC_|LD_PRELOAD$|PYTORCH_|OMP_NUM_THREADS$|MKL_NUM_THREADS$)")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU-seconds of a live process (all its threads); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def allocator_settings(environ: Mapping[str, str], retain_bytes: int = 0) -> dict:
    """The memory allocator a process runs with, the environment that tunes it or its threads, and
    the mallopt settings a serving process applies at start (``retain_bytes``: its
    ``server.malloc_retain_bytes``, cloudmatrix/allocator.py; 0 = none, glibc's defaults)."""
    env = {k: v for k, v in sorted(environ.items()) if _ALLOCATOR_ENV.match(k)}
    preload = environ.get("LD_PRELOAD", "")
    allocator = next((name for name in ("jemalloc", "tcmalloc", "mimalloc") if name in preload), "glibc malloc")
    mallopt = {"M_MMAP_THRESHOLD": MMAP_THRESHOLD_MAX, "M_TRIM_THRESHOLD": retain_bytes} if retain_bytes else {}
    return {"allocator": allocator, "env": env, "mallopt": mallopt}


def process_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


@dataclasses.dataclass(frozen=True)
class TopologyProcesses:
    """pid -> kind of every process of a run directory's topology, and the specs they started from."""

    kinds: dict[int, str]
    specs: tuple[ProcessSpec, ...] = ()

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> "TopologyProcesses":
        records, specs = load_state(Path(run_dir)), tuple(load_specs(Path(run_dir)).values())
        die_owner = _die_owners(specs, records)
        kinds = {}
        for r in records:
            kind = _SERVICE_KIND.get(r.service, r.service)
            kinds[r.pid] = die_owner.get(r.name, kind) if kind == "dies" else kind
        return cls(kinds, specs)

    def allocator(self) -> dict:
        """allocator_settings of the topology's processes (the first one's environment; every
        process applies its server.malloc_retain_bytes, the default unless the topology sets it)."""
        retain = ServerConfig().malloc_retain_bytes
        for spec in self.specs:
            retain = int(_setting(spec, "server.malloc_retain_bytes") or retain)
        return allocator_settings(process_environ(next(iter(self.kinds))) if self.kinds else {}, retain)

    def layout(self) -> dict[str, int]:
        """Processes per kind."""
        counts: dict[str, int] = {}
        for kind in self.kinds.values():
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: kind_order(kv[0])))

    def snapshot(self) -> dict[int, float | None]:
        return {pid: cpu_seconds(pid) for pid in self.kinds}


def _setting(spec: ProcessSpec, key: str) -> str | None:
    """The value a spec's overrides give ``key`` (the last one wins), or None."""
    values = [v for k, _, v in (o.partition("=") for o in spec.overrides) if k.strip() == key]
    return values[-1] if values else None


def _die_owners(specs: tuple[ProcessSpec, ...], records: list[ProcessRecord]) -> dict[str, str]:
    """Die process name -> "prefill dies" / "decode dies", from each instance's ``dies=`` setting:
    ``{addresses:<entry>}`` references or literal addresses."""
    by_address = {r.address: r.name for r in records}
    owners = {}
    for spec in specs:
        dies = _setting(spec, "dies") if spec.service in ("prefill", "decode") else None
        if dies is None:
            continue
        entries = referenced_entries(dies)
        names = [r.name for r in records if entry_of(r.name) in entries]
        names += [by_address[a.strip()] for a in dies.split(",") if a.strip() in by_address]
        owners.update({name: f"{spec.service} dies" for name in names})
    return owners


def cpu_split(kinds: dict[int, str], before: dict[int, float | None], after: dict[int, float | None],
              output_tokens: int) -> dict:
    """CPU-seconds of each kind between two snapshots, per output token and as a share of the total.
    A process that died or restarted in between counts up to its last reading (``lost`` names them)."""
    spent: dict[str, float] = {}
    lost = []
    for pid, kind in kinds.items():
        start, end = before.get(pid), after.get(pid)
        if start is None or end is None:
            lost.append(pid)
            continue
        spent[kind] = spent.get(kind, 0.0) + end - start
    total = sum(spent.values())
    per_kind = {kind: {"cpu_s": s, "cpu_s_per_token": s / max(output_tokens, 1), "share": s / total if total else 0.0}
                for kind, s in sorted(spent.items(), key=lambda kv: kind_order(kv[0]))}
    dies = sum(s for kind, s in spent.items() if kind in DIE_KINDS)
    return {"kinds": per_kind, "cpu_s": total, "cpu_s_per_token": total / max(output_tokens, 1),
            "non_die_share": (total - dies) / total if total else 0.0, "output_tokens": output_tokens,
            "lost_pids": lost}


def kind_order(kind: str) -> int:
    """Sort key: the kinds in KINDS order, any other after them."""
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def describe(split: dict) -> str:
    """One line: CPU-ms per output token by kind and the share outside the dies."""
    parts = ", ".join(f"{k} {v['cpu_s_per_token'] * 1e3:.2f} ({v['share']:.0%})" for k, v in split["kinds"].items())
    return (f"CPU {split['cpu_s_per_token'] * 1e3:.2f} ms per output token: {parts}; "
            f"outside the dies {split['non_die_share']:.0%}")
