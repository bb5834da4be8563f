"""The run's supervisor (`restart: on-failure`): a SIGKILLed process comes back on its address,
SERVING, counted in the state; restarts back off and stop at max_restarts; an entry without the
policy stays down; `cmx down` stops the supervisor before the processes."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from cloudmatrix.launcher import supervisor
from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.processes import is_alive, load_state
from cloudmatrix.launcher.topology import parse_topology
from cloudmatrix.rpc.channel import health_check_sync
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)


def _record(run_dir: Path, name: str):
    return next(r for r in load_state(run_dir) if r.name == name)


def test_a_crashed_process_is_restarted_on_its_address_with_backoff_until_max_restarts(tmp_path):
    run_dir = tmp_path / "run"
    topology = parse_topology({"name": "supervised", "services": [
        {"name": "kvcache", "service": "kvcache", "restart": "on-failure", "max_restarts": 2},
        {"name": "fabric", "service": "ub_fabric"}]}, Path("."))
    bring_up(topology, run_dir, 60.0)
    try:
        first = _record(run_dir, "kvcache-0")
        fabric = _record(run_dir, "fabric-0")
        for restarts in (1, 2):
            before = _record(run_dir, "kvcache-0")
            os.kill(before.pid, signal.SIGKILL)
            # back, and seen SERVING by the supervisor (it records the ports the process reported)
            assert wait_for(lambda: _record(run_dir, "kvcache-0").restarts == restarts
                            and _record(run_dir, "kvcache-0").metrics_port > 0
                            and health_check_sync(first.address, timeout=1.0) == "SERVING", timeout_s=120.0)
            again = _record(run_dir, "kvcache-0")
            assert again.pid != before.pid and again.address == first.address  # same address for its peers
        log_file = run_dir / "logs" / "supervisor.log"
        assert wait_for(lambda: "no restarts left" in log_file.read_text(), timeout_s=120.0)
        log = log_file.read_text()
        assert "restart 1 of 2, after 1 s of backoff" in log and "restart 2 of 2, after 2 s of backoff" in log
        assert "failed" not in log
        os.kill(_record(run_dir, "kvcache-0").pid, signal.SIGKILL)  # a third crash: no restarts left
        os.kill(fabric.pid, signal.SIGKILL)                          # no policy: stays down
        assert wait_for(lambda: not is_alive(_record(run_dir, "kvcache-0")), timeout_s=120.0)
        time.sleep(supervisor.backoff_s(2) + 1.0)  # longer than the next backoff would be
        assert not is_alive(_record(run_dir, "kvcache-0")) and not is_alive(_record(run_dir, "fabric-0"))
        assert _record(run_dir, "kvcache-0").restarts == 2
    finally:
        pid = int((run_dir / supervisor.PID_FILE).read_text())
        bring_down(run_dir, grace_s=5.0)
    assert not (run_dir / supervisor.PID_FILE).exists() and not supervisor._is_supervisor(pid)


def test_a_bad_restart_policy_names_the_field():
    with pytest.raises(ValueError, match=r"services\[0\]\.restart"):
        parse_topology({"services": [{"service": "kvcache", "restart": "always"}]}, Path("."))
    with pytest.raises(ValueError, match=r"services\[0\]\.max_restarts"):
        parse_topology({"services": [{"service": "kvcache", "restart": "on-failure", "max_restarts": 0}]}, Path("."))
