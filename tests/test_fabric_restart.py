"""Processes SIGKILLed and restarted by the run's supervisor (`restart: on-failure`), with real
processes and nothing else restarted:

- the UB fabric: requests get clear errors while it is down, then the dies re-attach at their next
  step and the EP2 decode instance serves the same greedy tokens again;
- a decode die under a running request: the request fails fast with 503, the instance turns
  NOT_SERVING, and once the supervisor has the die back the instance reloads it (its weights from the
  model cache in the kvcache pool) and serves the same tokens again."""
from __future__ import annotations

import concurrent.futures
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
from cloudmatrix.rpc.channel import health_check_sync
from tests.services import decode_running
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def supervised(tmp_path_factory, tiny_checkpoint):
    """An EP2 decode instance whose fabric and dies the supervisor restarts; dies load through the
    model cache. Yields (run dir, the gateway's HTTP port, a request body, its greedy text)."""
    run_dir = tmp_path_factory.mktemp("supervised") / "run"
    common = {"checkpoint": str(tiny_checkpoint), "precision": "fp32", "kvcache": "{addresses:kvcache}",
              "fabric": "{addresses:fabric}", "model_cache": True, "probe_interval_s": 0.5}
    topology = parse_topology({"name": "supervised", "services": [
        {"name": "kvcache", "service": "kvcache"},
        {"name": "fabric", "service": "ub_fabric", "restart": "on-failure"},
        {"name": "pdie", "service": "npu_emulator"},
        {"name": "ddie", "service": "npu_emulator", "count": 2, "restart": "on-failure"},
        {"name": "prefill", "service": "prefill", "set": {**common, "dies": "{addresses:pdie}"}},
        {"name": "decode", "service": "decode", "set": {**common, "dies": "{addresses:ddie}"}},
        {"name": "gateway", "service": "gateway", "set": {
            "checkpoint": str(tiny_checkpoint), "prefill": "{addresses:prefill}", "decode": "{addresses:decode}"}}]},
        Path("."))
    bring_up(topology, run_dir, 180.0)
    try:
        port = json.loads((run_dir / "ready" / "gateway-0.http.json").read_text())["http_port"]
        body = {"model": Path(tiny_checkpoint).resolve().name, "prompt": "Through the fabric", "max_tokens": 4,
                "temperature": 0}
        status, reply = _post(port, body)
        assert status == 200, reply
        yield run_dir, port, body, reply["choices"][0]["text"]
    finally:
        bring_down(run_dir, grace_s=5.0)


def _record(run_dir: Path, name: str):
    return next(r for r in load_state(run_dir) if r.name == name)


def _served_again(port: int, body: dict, answers: list) -> bool:
    status, reply = _post(port, body)
    answers.append((status, reply))
    return status == 200


def _assert_only_restarted(run_dir: Path, before: dict, name: str) -> None:
    """``name`` runs again on its address after one more restart; every other process is the same one."""
    record = _record(run_dir, name)
    assert record.restarts == before[name].restarts + 1 and is_alive(record)
    assert record.address == before[name].address
    others = [r for r in load_state(run_dir) if r.name != name]
    assert all(is_alive(r) and r.pid == before[r.name].pid for r in others)


def test_a_killed_fabric_restarted_by_the_supervisor_and_the_ep2_instance_serves_again(supervised):
    run_dir, port, body, expected = supervised
    before = {r.name: r for r in load_state(run_dir)}
    os.kill(before["fabric-0"].pid, signal.SIGKILL)
    answers: list = []
    assert wait_for(lambda: _served_again(port, body, answers), 120.0), answers[-3:]
    for status, reply in answers[:-1]:  # while the fabric was away: clear refusals, no 500s, no hangs
        assert status == 503 and reply["error"]["code"] == "instance_unavailable", reply
        assert "127.0.0.1" not in reply["error"]["message"]
    assert answers[-1][1]["choices"][0]["text"] == expected  # the same greedy tokens as before
    _assert_only_restarted(run_dir, before, "fabric-0")


def _dies_loaded(run_dir: Path) -> list[dict]:
    """The decode instance's "dies loaded" log records, oldest first."""
    lines = Path(_record(run_dir, "decode-0").log).read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["msg"] == "dies loaded"]


def test_a_killed_die_restarted_by_the_supervisor_and_the_instance_reloads_from_the_model_cache(supervised):
    run_dir, port, body, expected = supervised
    before = {r.name: r for r in load_state(run_dir)}
    decode = before["decode-0"].address
    loads = len(_dies_loaded(run_dir))
    long = {**body, "max_tokens": 1500, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(_post, port, long)
        assert wait_for(lambda: decode_running(decode) == 1, 60.0)
        os.kill(before["ddie-1"].pid, signal.SIGKILL)
        status, reply = running.result()
    assert status == 503 and reply["error"]["code"] == "instance_unavailable", reply  # fast and clear
    assert "127.0.0.1" not in reply["error"]["message"]
    answers: list = []
    assert wait_for(lambda: _served_again(port, body, answers), 180.0), answers[-3:]
    assert answers[-1][1]["choices"][0]["text"] == expected
    assert health_check_sync(decode) == "SERVING"
    reloads = _dies_loaded(run_dir)[loads:]
    assert reloads and reloads[-1]["dies"] == 2 and reloads[-1]["from_model_cache"] == 2, reloads
    _assert_only_restarted(run_dir, before, "ddie-1")
