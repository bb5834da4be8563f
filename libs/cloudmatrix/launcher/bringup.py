"""Start a topology's processes in waves (referenced entries SERVING before their users) and stop
them: what `cmx up` / `cmx down` and the benchmarks that bring up their own topology share."""
from __future__ import annotations

import json
from pathlib import Path

from cloudmatrix.launcher import prometheus, supervisor
from cloudmatrix.launcher.processes import (
    CERT_DIR,
    ProcessRecord,
    load_state,
    save_state,
    spawn,
    stop_all,
    stop_in_order,
    wait_healthy,
)
from cloudmatrix.launcher.topology import Topology
from cloudmatrix.launcher.waves import resolve, waves
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.rpc.tls import TlsFiles, make_certs, process_tls, use_process_tls


def bring_up(topology: Topology, run_dir: Path, timeout_s: float) -> list[ProcessRecord]:
    """Every process SERVING, state and a Prometheus scrape config saved in ``run_dir``; on a
    failure the started ones are stopped and the error (StartupError, KeyboardInterrupt)
    propagates. A ``tls`` topology gets a new CA and certificates in ``<run_dir>/certs`` (kept if
    there already), and this process talks to it as ``client``."""
    previous = process_tls()
    if topology.tls:
        cert_dir = run_dir / CERT_DIR
        if not (cert_dir / "ca.pem").is_file():
            make_certs(cert_dir)
        topology = topology.with_certificates(cert_dir)
        use_process_tls(TlsFiles.in_dir(cert_dir, "client"))  # for the health checks below
    records: list[ProcessRecord] = []
    try:
        for wave in waves(topology.processes):
            procs = [spawn(resolve(spec, records, run_dir), run_dir) for spec in wave]
            records += [r for _, r in procs]
            save_state(run_dir, topology, records)
            wait_healthy(procs, health_check_sync, timeout_s)
    except BaseException:
        stop_all(records, grace_s=5.0)
        (run_dir / "state.json").unlink(missing_ok=True)
        raise
    finally:
        use_process_tls(previous)
    save_state(run_dir, topology, records)
    prometheus.write(run_dir, records, topology.name)
    write_telemetry(run_dir, topology)
    if any(p.restart == "on-failure" for p in topology.processes):
        supervisor.start(run_dir)
    return records


TELEMETRY_FILE = "telemetry.json"


def write_telemetry(run_dir: Path, topology: Topology) -> None:
    """Where the run's spans go, for `cmx trace` (kept after `cmx down`, like the spans)."""
    where = {"topology": topology.name, "span_dir": str(run_dir / "spans"), "otlp_endpoint": topology.otlp_endpoint}
    (run_dir / TELEMETRY_FILE).write_text(json.dumps(where, indent=2) + "\n")


def read_telemetry(run_dir: Path) -> dict:
    path = run_dir / TELEMETRY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def bring_down(run_dir: Path, grace_s: float) -> tuple[list[ProcessRecord], list[str]]:
    """Stop the run's supervisor (no restarts from now on), then what ``run_dir``'s state lists,
    tier by tier (``processes.STOP_ORDER``: requests in flight finish first); returns the records
    and the names killed hard."""
    supervisor.stop(run_dir)
    records = load_state(run_dir)
    killed = stop_in_order(records, grace_s)
    (run_dir / "state.json").unlink(missing_ok=True)
    return records, killed
