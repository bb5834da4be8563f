"""The run's supervisor: restarts the processes whose topology entry says ``restart: on-failure``
when they die, after a backoff of 1 s, 2 s, 4 s ... (at most 30 s), up to ``max_restarts`` times
each, on the address it had, so that its peers find it again. `cmx up` (``bring_up``) starts it
when an entry asks for restarts; `cmx down` (``bring_down``) stops it before the processes. It
exits by itself once the run's state file is gone. Its log: ``<run-dir>/logs/supervisor.log``.

    python -m cloudmatrix.launcher.supervisor --run-dir runs/local
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cloudmatrix.launcher.processes import (
    STATE_FILE,
    ProcessRecord,
    StartupError,
    is_alive,
    load_specs,
    load_state,
    replace_record,
    run_tls,
    spawn,
    wait_healthy,
)
from cloudmatrix.launcher.topology import ProcessSpec
from cloudmatrix.launcher.waves import resolve
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.rpc.tls import use_process_tls

log = logging.getLogger("cloudmatrix.supervisor")
PID_FILE = "supervisor.pid"
FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0


def backoff_s(restarts: int) -> float:
    """The wait before restart number ``restarts + 1``."""
    return min(FIRST_BACKOFF_S * 2 ** restarts, MAX_BACKOFF_S)


class Supervisor:
    def __init__(self, run_dir: Path, health_timeout_s: float = 120.0) -> None:
        self.run_dir, self.health_timeout_s = run_dir, health_timeout_s
        self.died_at: dict[str, float] = {}  # name -> when it was first seen dead

    def step(self) -> bool:
        """One pass over the run; False once the run is gone (stop supervising)."""
        if not (self.run_dir / STATE_FILE).is_file():
            return False
        specs, records = load_specs(self.run_dir), load_state(self.run_dir)
        for record in records:
            spec = specs.get(record.name)
            if spec is None or spec.restart != "on-failure" or is_alive(record):
                self.died_at.pop(record.name, None)
                continue
            if record.restarts >= spec.max_restarts:
                continue  # given up on (logged when the last restart was spent)
            first_seen = self.died_at.setdefault(record.name, time.monotonic())
            if time.monotonic() - first_seen >= backoff_s(record.restarts):
                self._restart(spec, record, records)
        return True

    def _restart(self, spec: ProcessSpec, record: ProcessRecord, records: list[ProcessRecord]) -> None:
        attempt = record.restarts + 1
        log.warning("restarting %s (restart %d of %d, after %.0f s of backoff)", record.name, attempt,
                    spec.max_restarts, backoff_s(record.restarts))
        # the same port: its peers were given this address
        again = dataclasses.replace(resolve(spec, records, self.run_dir), port=record.port or spec.port)
        proc, new = spawn(again, self.run_dir)
        new.restarts, new.port = attempt, again.port
        self.died_at.pop(record.name, None)
        if not replace_record(self.run_dir, new):  # the run was stopped meanwhile
            proc.kill()
            return
        try:
            wait_healthy([(proc, new)], health_check_sync, self.health_timeout_s)
        except StartupError as err:
            log.error("restart %d of %s failed: %s", attempt, record.name, err)
        else:
            replace_record(self.run_dir, new)  # with its reported ports
            log.warning("%s is SERVING again at %s (pid %d)", record.name, new.address, new.pid)
        if attempt == spec.max_restarts:
            log.error("%s: no restarts left (max_restarts %d)", record.name, spec.max_restarts)


def start(run_dir: Path) -> int:
    """Start the supervisor of ``run_dir`` as its own process; its pid."""
    log_path = run_dir / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cloudmatrix.launcher.supervisor", "--run-dir", str(run_dir)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    (run_dir / PID_FILE).write_text(f"{proc.pid}\n")
    return proc.pid


def stop(run_dir: Path, timeout_s: float = 10.0) -> None:
    """Stop the supervisor of ``run_dir``, if it runs, before anything else is stopped."""
    path = run_dir / PID_FILE
    try:
        pid = int(path.read_text())
    except (FileNotFoundError, ValueError):
        return
    if _is_supervisor(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _is_supervisor(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_supervisor(pid):
            os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)


def _is_supervisor(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"cloudmatrix.launcher.supervisor" in cmdline and state != "Z"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloudmatrix.launcher.supervisor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="the run to supervise")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between passes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run_dir = Path(args.run_dir).resolve()
    use_process_tls(run_tls(run_dir))  # health checks of a mutual-TLS run
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    supervisor = Supervisor(run_dir)
    log.info("supervising %s", run_dir)
    while not stopping and supervisor.step():
        time.sleep(args.poll)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
