"""A decode die SIGKILLed under a running request: the request gets 503 instance_unavailable with
a clean message, decode's health and the gateway's /health say so, and once the die restarts the
instance reloads and serves the local engine's tokens again."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import urllib.request

import pytest

from cloudmatrix.checkpoints import load_model
from cloudmatrix.launcher.processes import spawn, stop_all, wait_healthy
from cloudmatrix.launcher.topology import ProcessSpec
from cloudmatrix.model.generate import generate
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.sampling_params import SamplingParams
from tests.services import running_services
from tests.test_decode import _load, _wait_for
from tests.test_gateway import _post

pytestmark = pytest.mark.timeout(400)


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_a_killed_decode_die_gives_503_not_serving_and_the_instance_comes_back(tmp_path, tiny_checkpoint):
    base = [("kv0", "kvcache", ()), ("fabric", "ub_fabric", ())] + [(d, "npu_emulator", ()) for d in
                                                                     ("pdie0", "ddie0", "ddie1")]
    with running_services(tmp_path, base) as r:
        common = (f"checkpoint={tiny_checkpoint}", f"kvcache={r['kv0'].address}", "probe_interval_s=0.5")
        instances = [("prefill", "prefill", common + (f"dies={r['pdie0'].address}",)),
                     ("decode", "decode", common + (f"dies={r['ddie0'].address},{r['ddie1'].address}",
                                                    f"fabric={r['fabric'].address}"))]
        with running_services(tmp_path, instances) as s:
            decode = s["decode"].address
            sets = (f"checkpoint={tiny_checkpoint}", f"prefill={s['prefill'].address}", f"decode={decode}")
            with running_services(tmp_path, [("gateway", "gateway", sets)]):
                http = json.loads((tmp_path / "ready" / "gateway.http.json").read_text())["http_port"]
                model = os.path.basename(os.path.realpath(tiny_checkpoint))
                long = {"model": model, "prompt": "Faults", "max_tokens": 1500, "ignore_eos": True}
                assert _health(http) == 200
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    running = pool.submit(_post, http, "/v1/completions", long)
                    assert _wait_for(lambda: _load(decode).running_requests == 1)
                    os.kill(r["ddie1"].pid, signal.SIGKILL)
                    status, body = running.result()
                assert status == 503 and body["error"]["code"] == "instance_unavailable", body
                message = body["error"]["message"]
                assert "127.0.0.1" not in message and "Error" not in message and "die 1" in message, message
                assert _wait_for(lambda: health_check_sync(decode) == "NOT_SERVING")
                status, body = _post(http, "/v1/completions", {**long, "max_tokens": 4})
                assert status == 503 and body["error"]["code"] == "instance_unavailable", body
                assert _wait_for(lambda: _health(http) == 503)

                port = int(r["ddie1"].address.rsplit(":", 1)[1])
                restarted = spawn(ProcessSpec("ddie1", "npu_emulator", "127.0.0.1", port, None, ()), tmp_path)
                try:
                    wait_healthy([restarted], health_check_sync, timeout_s=90)
                    assert _wait_for(lambda: health_check_sync(decode) == "SERVING", timeout_s=120)
                    assert _wait_for(lambda: _health(http) == 200)
                    prompt = [3, 14, 15, 92, 65, 35]
                    status, body = _post(http, "/v1/completions", {"model": model, "prompt": prompt,
                                                                   "max_tokens": 8, "ignore_eos": True,
                                                                   "temperature": 0})
                finally:
                    stop_all([restarted[1]], grace_s=10)
                    restarted[0].wait(timeout=10)
    assert status == 200, body
    local = load_model(tiny_checkpoint)
    expected = list(generate(local, prompt, SamplingParams(max_tokens=8), ignore_eos=True))
    assert body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["text"] == TextTokenizer.load(tiny_checkpoint).decode(expected)
