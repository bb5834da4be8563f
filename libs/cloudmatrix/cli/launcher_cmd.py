"""`cmx up / status / down`: run a topology's service processes on this machine."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cloudmatrix.launcher import preflight
from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.processes import ProcessRecord, StartupError, is_alive, load_state, run_tls
from cloudmatrix.launcher.topology import load_topology
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.rpc.tls import use_process_tls

DEFAULT_TOPOLOGY = "topologies/local.yaml"
DEFAULT_RUN_DIR = "runs/local"


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start the processes a topology lists and wait until all are SERVING")
    up.add_argument("--topology", default=DEFAULT_TOPOLOGY, help="topology YAML file (docs/launcher.md)")
    up.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="logs, ready files, spans and state go here")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every health check")
    up.add_argument("--otlp-endpoint", default=None, metavar="HOST:PORT",
                    help="every process also exports its spans to this OTLP gRPC collector (overrides the "
                         "topology's otlp_endpoint; spans still go to <run-dir>/spans too)")
    up.set_defaults(handler=_up)
    status = sub.add_parser("status", help="print each process, its address and its health")
    status.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="the run directory `cmx up` used")
    status.set_defaults(handler=_status)
    down = sub.add_parser("down", help="stop the processes gracefully (SIGTERM, then SIGKILL after --grace)")
    down.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="the run directory `cmx up` used")
    down.add_argument("--grace", type=float, default=15.0,
                      help="seconds each tier (gateways, instances, dies and fabric, pool) has after SIGTERM before SIGKILL")
    down.set_defaults(handler=_down)


def _up(args: argparse.Namespace) -> int:
    topology = load_topology(args.topology).with_otlp_endpoint(args.otlp_endpoint)
    run_dir = Path(args.run_dir).resolve()
    preflight.check(topology, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "state.json").exists() and any(map(is_alive, load_state(run_dir))):
        raise ValueError(f"{run_dir} already runs a topology; stop it first with `cmx down --run-dir {args.run_dir}`")
    try:
        records = bring_up(topology, run_dir, args.timeout)
    except (StartupError, KeyboardInterrupt) as exc:
        print(f"cmx up: {exc}", file=sys.stderr)
        return 1
    print(f"topology {topology.name!r}: {len(records)} processes SERVING (run dir {run_dir})")
    _print_table(records, run_dir)
    return 0


def _print_table(records: list[ProcessRecord], run_dir: Path) -> None:
    use_process_tls(run_tls(run_dir))
    print(f"{'NAME':<20} {'SERVICE':<14} {'PID':>7}  {'ADDRESS':<22} {'METRICS':>7}  {'HEALTH':<12} LOG")
    for r in records:
        health = health_check_sync(r.address, timeout=1.0) if is_alive(r) and r.port else "STOPPED"
        print(f"{r.name:<20} {r.service:<14} {r.pid:>7}  {r.address:<22} {r.metrics_port or '-':>7}  "
              f"{health:<12} {r.log}")
    for r in records:
        url = _http_url(r, run_dir)
        if url and is_alive(r):
            print(f"{r.name}: OpenAI API at {url}/v1")


def _http_url(record: ProcessRecord, run_dir: Path) -> str | None:
    """A gateway's HTTP base URL, from the ready file it writes once its HTTP server listens."""
    path = run_dir / "ready" / f"{record.name}.http.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if "http_port" not in info:
        return None
    host = info.get("http_host") or record.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{info['http_port']}"


def _status(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    records = load_state(run_dir)
    _print_table(records, run_dir)
    return 0 if all(map(is_alive, records)) else 1


def _down(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    exited = [r.name for r in load_state(run_dir) if not is_alive(r)]
    records, killed = bring_down(run_dir, args.grace)
    for name in killed:
        print(f"{name} did not stop within {args.grace:.0f} s and was killed", file=sys.stderr)
    print(f"stopped {len(records) - len(exited)} processes"
          + (f"; {len(exited)} had already exited: {', '.join(exited)}" if exited else ""))
    return 0
