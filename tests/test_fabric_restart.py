"""The UB fabric SIGKILLed and restarted by the run's supervisor (`restart: on-failure`), with real
processes: requests get clear errors while it is down, then the dies re-attach at their next step
and the EP2 decode instance serves the same greedy tokens again, no other process restarted."""
from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cloudmatrix.launcher.bringup import bring_down, bring_up
from cloudmatrix.launcher.processes import is_alive, load_state
from cloudmatrix.launcher.topology import parse_topology
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_killed_fabric_restarted_by_the_supervisor_and_the_ep2_instance_serves_again(tmp_path, tiny_checkpoint):
    run_dir = tmp_path / "run"
    common = {"checkpoint": str(tiny_checkpoint), "precision": "fp32", "kvcache": "{addresses:kvcache}",
              "fabric": "{addresses:fabric}"}
    topology = parse_topology({"name": "fabric-restart", "services": [
        {"name": "kvcache", "service": "kvcache"},
        {"name": "fabric", "service": "ub_fabric", "restart": "on-failure"},
        {"name": "pdie", "service": "npu_emulator"}, {"name": "ddie", "service": "npu_emulator", "count": 2},
        {"name": "prefill", "service": "prefill", "set": {**common, "dies": "{addresses:pdie}"}},
        {"name": "decode", "service": "decode", "set": {**common, "dies": "{addresses:ddie}"}},
        {"name": "gateway", "service": "gateway", "set": {
            "checkpoint": str(tiny_checkpoint), "prefill": "{addresses:prefill}", "decode": "{addresses:decode}"}}]},
        Path("."))
    records = {r.name: r for r in bring_up(topology, run_dir, 180.0)}
    try:
        port = json.loads((run_dir / "ready" / "gateway-0.http.json").read_text())["http_port"]
        body = {"model": Path(tiny_checkpoint).resolve().name, "prompt": "Through the fabric", "max_tokens": 4,
                "temperature": 0}
        status, reply = _post(port, body)
        assert status == 200
        expected = reply["choices"][0]["text"]
        os.kill(records["fabric-0"].pid, signal.SIGKILL)
        answers = []

        def served_again() -> bool:
            status, reply = _post(port, body)
            answers.append((status, reply))
            return status == 200

        assert wait_for(served_again, 120.0), answers[-3:]
        for status, reply in answers[:-1]:  # while the fabric was away: clear refusals, no 500s, no hangs
            assert status == 503 and reply["error"]["code"] == "instance_unavailable", reply
            assert "127.0.0.1" not in reply["error"]["message"]
        assert answers[-1][1]["choices"][0]["text"] == expected  # the same greedy tokens as before
        fabric = next(r for r in load_state(run_dir) if r.name == "fabric-0")
        assert fabric.restarts == 1 and is_alive(fabric) and fabric.address == records["fabric-0"].address
        others = [r for r in load_state(run_dir) if r.name != "fabric-0"]
        assert all(is_alive(r) and r.pid == records[r.name].pid for r in others)  # nothing else restarted
    finally:
        bring_down(run_dir, grace_s=5.0)
