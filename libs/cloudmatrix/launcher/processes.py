"""Start, watch and stop the service processes of a topology; remember them in a state file."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cloudmatrix.launcher.topology import ProcessSpec, Topology
from cloudmatrix.rpc.tls import TlsFiles

STATE_FILE = "state.json"


@dataclasses.dataclass
class ProcessRecord:
    """A started process as `cmx status` and `cmx down` see it."""

    name: str
    service: str
    pid: int
    log: str
    ready_file: str
    host: str = ""
    port: int = 0
    metrics_port: int = 0
    restarts: int = 0  # times the run's supervisor restarted it

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" if self.port else "-"


class StartupError(RuntimeError):
    """A process died or never became healthy; names the process and its log."""


def _command(spec: ProcessSpec, run_dir: Path, ready_file: Path) -> list[str]:
    cmd = [sys.executable, "-m", f"services.{spec.service}"]
    if spec.config:
        cmd += ["--config", spec.config]
    overrides = [o.replace("{run_dir}", str(run_dir)) for o in spec.overrides]
    sets = [f"server.host={spec.host}", f"server.port={spec.port}", f"server.ready_file={ready_file}",
            f"server.run_dir={run_dir}", f"server.service_name={spec.name}", *overrides]
    return cmd + [arg for s in sets for arg in ("--set", s)]


def ready_dir(run_dir: Path) -> Path:
    """Where a run's processes write their ready files (<name>.json, while SERVING)."""
    return run_dir / "ready"


def spawn(spec: ProcessSpec, run_dir: Path) -> tuple[subprocess.Popen, ProcessRecord]:
    log = run_dir / "logs" / f"{spec.name}.log"
    ready = ready_dir(run_dir) / f"{spec.name}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(_command(spec, run_dir, ready), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, ProcessRecord(spec.name, spec.service, proc.pid, str(log), str(ready), host=spec.host)


def _read_ready(record: ProcessRecord) -> bool:
    try:
        info = json.loads(Path(record.ready_file).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    record.port, record.metrics_port = int(info["port"]), int(info.get("metrics_port") or 0)
    return True


def wait_healthy(procs: list[tuple[subprocess.Popen, ProcessRecord]], health: Callable[[str], str],
                 timeout_s: float) -> None:
    """Block until every process reports SERVING; raise StartupError naming the first failure."""
    pending = dict((r.name, (p, r)) for p, r in procs)
    deadline = time.monotonic() + timeout_s
    while pending:
        for name, (proc, record) in list(pending.items()):
            if proc.poll() is not None:
                raise StartupError(f"{name} ({record.service}) exited with code {proc.returncode} before it was "
                                   f"healthy; log: {record.log}")
            if _read_ready(record) and health(f"{record.host}:{record.port}") == "SERVING":
                del pending[name]
        if pending and time.monotonic() > deadline:
            name, (_, record) = next(iter(pending.items()))
            raise StartupError(f"{name} ({record.service}) did not report SERVING within {timeout_s:.0f} s; "
                               f"log: {record.log}")
        time.sleep(0.05)


CERT_DIR = "certs"


def save_state(run_dir: Path, topology: Topology, records: list[ProcessRecord]) -> None:
    state = {"topology": topology.name, "tls": topology.tls, "processes": [dataclasses.asdict(r) for r in records],
             "specs": {p.name: dataclasses.asdict(p) for p in topology.processes}}
    (run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def load_state(run_dir: Path) -> list[ProcessRecord]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"nothing is running from {run_dir} (no {STATE_FILE}); start it with `cmx up`")
    return [ProcessRecord(**p) for p in json.loads(path.read_text())["processes"]]


def load_specs(run_dir: Path) -> dict[str, ProcessSpec]:
    """The specs the run's processes were started from (for restarts)."""
    raw = json.loads((run_dir / STATE_FILE).read_text()).get("specs", {})
    return {name: ProcessSpec(**{**spec, "overrides": tuple(spec["overrides"])}) for name, spec in raw.items()}


def replace_record(run_dir: Path, record: ProcessRecord) -> bool:
    """Put ``record`` in the state in place of the one with its name; False when no state is left
    (the run was stopped meanwhile)."""
    path = run_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    state["processes"] = [dataclasses.asdict(record) if p["name"] == record.name else p for p in state["processes"]]
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)
    return True


def run_tls(run_dir: Path) -> TlsFiles | None:
    """The client identity for talking to the run in ``run_dir`` when it uses mutual TLS, else None
    (also when nothing runs there)."""
    path = run_dir / STATE_FILE
    if not path.is_file() or not json.loads(path.read_text()).get("tls"):
        return None
    return TlsFiles.in_dir(run_dir / CERT_DIR, "client")


def is_alive(record: ProcessRecord) -> bool:
    """True while the pid exists and still runs our service (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{record.pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return f"services.{record.service}".encode() in cmdline and stat.split(")")[-1].split()[0] != "Z"


# `cmx down` stops the tiers in this order, each after the one before has exited: the gateways
# first (they stop taking requests and finish the ones in flight), then the instances (nothing in
# flight any more), then the dies and the fabric they stepped on, then the pool. Any other service
# goes last.
STOP_ORDER = (("gateway",), ("prefill", "decode"), ("npu_emulator", "ub_fabric"), ("kvcache",))


def stop_in_order(records: list[ProcessRecord], grace_s: float) -> list[str]:
    """``stop_all`` tier by tier (``STOP_ORDER``), each tier given ``grace_s``; names killed hard."""
    tiers = [[r for r in records if r.service in tier] for tier in STOP_ORDER]
    tiers.append([r for r in records if not any(r.service in tier for tier in STOP_ORDER)])
    return [name for tier in tiers if tier for name in stop_all(tier, grace_s)]


def stop_all(records: list[ProcessRecord], grace_s: float) -> list[str]:
    """SIGTERM every live process, wait up to grace_s, SIGKILL the rest; returns names killed hard."""
    for record in filter(is_alive, records):
        os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(map(is_alive, records)) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = [r.name for r in records if is_alive(r)]
    for record in filter(is_alive, records):
        os.kill(record.pid, signal.SIGKILL)
    return killed
