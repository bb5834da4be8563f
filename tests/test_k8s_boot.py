"""Boot from the manifests: the dev overlay, rendered by kustomize, runs as local processes with
each container's command, args, env and ports exactly as its object gives them (tests/k8s_pods.py
stands in for the pod network, DNS and volumes), and serves streamed completions through the
gateway to the official openai client: the local engine's tokens, from the checkpoint the pods'
init containers made. Once as it is, and once with the decode StatefulSet patched to 2 replicas
(one number, as an overlay would), where both decode instances serve, and then the pod lifecycle
of a cluster: a decode pod deleted mid-stream finishes that stream itself (its dies and fabric are
sidecars, stopped after it) while new requests go to the other; created again, it is found (the
gateway reads the headless Service's records) and gets requests; a kvcache pod deleted and created
again is read again. Drift between the manifests and the code fails here."""
from __future__ import annotations

import os
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.clients.instances import DecodeClient
from cloudmatrix.clients.sync import SyncClient
from cloudmatrix.model.generate import generate
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.rpc.channel import health_check_sync
from cloudmatrix.sampling_params import SamplingParams
from tests.k8s_pods import LocalCluster
from tests.k8s_render import K8S, render, rendered
from tests.waiting import under_traffic

pytestmark = pytest.mark.timeout(600)
PROMPTS = [f"Kubernetes pod {i} asks the supernode about" for i in range(6)]
MAX_TOKENS = 12


def _boot(objects: list[dict], root: Path) -> LocalCluster:
    cluster = LocalCluster(objects, root)
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=300.0)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _client(cluster: LocalCluster) -> openai.OpenAI:
    gateway = cluster.container("gateway-0", "gateway")
    return openai.OpenAI(base_url=f"http://{gateway.pod.ip}:{gateway.port('http')}/v1", api_key="unused",
                         max_retries=0, timeout=120.0)


def _stream(client: openai.OpenAI, prompt: str, max_tokens: int = MAX_TOKENS,
            started: threading.Event | None = None) -> tuple[str, int]:
    stream = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    text, tokens = "", 0
    for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        if started is not None and len(text) > 16:
            started.set()
    return text, tokens


def _local_text(cluster: LocalCluster, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    """The local engine's greedy text on the checkpoint the gateway pod's init containers made."""
    checkpoint = cluster.pod("gateway-0").root / "volumes" / "models" / "cmx-tiny-py-int8"
    model = load_for_precision(checkpoint, parse_precision("int8-pasa"))
    tokenizer = TextTokenizer.load(checkpoint)
    ids = generate(model, tokenizer.encode(prompt), SamplingParams(max_tokens=max_tokens), ignore_eos=True)
    return tokenizer.decode(list(ids))


def _metric(cluster: LocalCluster, pod: str, pattern: str) -> float:
    """The sum of the samples matching ``pattern`` (a metric name, with labels) on the /metrics
    of the main container of ``pod``."""
    container = cluster.container(pod, pod.rsplit("-", 1)[0])
    with urllib.request.urlopen(f"http://{container.pod.ip}:{container.port('metrics')}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"(?m)^{pattern} (\S+)$", text))


def _steps(cluster: LocalCluster, pod: str) -> float:
    """Engine steps the instance in ``pod`` has run."""
    return _metric(cluster, pod, r"cmx_engine_step_seconds_count\{[^}]*\}")


def _running(cluster: LocalCluster, pod: str) -> int:
    container = cluster.container(pod, "decode")
    with SyncClient(DecodeClient, f"{container.pod.ip}:{container.port('grpc')}") as client:
        return client.load().requests


def _serving_at(cluster: LocalCluster, pod: str) -> float:
    """The moment every container of the (re)created ``pod`` answers SERVING."""
    cluster.wait_ready(timeout_s=300.0, pods=[pod], listed=False)
    return time.monotonic()


def _until(condition, client: openai.OpenAI) -> float:
    """Short streams through the gateway until ``condition()``; the moment it held."""
    def request(i: int) -> None:
        assert _stream(client, PROMPTS[i], max_tokens=4)[1] == 4
    return under_traffic(condition, request)


def test_the_dev_overlay_boots_from_its_manifests_and_serves_a_streamed_completion(tmp_path):
    cluster = _boot(list(rendered("dev")), tmp_path)
    try:
        assert {p.name for p in cluster.pods} == {"kvcache-0", "kvcache-1", "prefill-0", "decode-0", "gateway-0"}
        text, tokens = _stream(_client(cluster), PROMPTS[0])
        assert tokens == MAX_TOKENS and text == _local_text(cluster, PROMPTS[0])
        assert _client(cluster).models.list().data[0].trained is True  # the shipped model's INT8 copy
    finally:
        cluster.stop()


def test_with_the_decode_replicas_patched_to_2_both_serve_and_pods_drain_and_come_back(tmp_path, record_property):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(K8S / 'overlays' / 'dev', overlay)}]\n"
        "replicas: [{name: decode, count: 2}]\n")
    cluster = _boot(render(overlay), tmp_path / "pods")
    try:
        assert {"decode-0", "decode-1"} <= {p.name for p in cluster.pods}
        client = _client(cluster)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda p: _stream(client, p), PROMPTS))
        assert answers == [(_local_text(cluster, p), MAX_TOKENS) for p in PROMPTS]
        assert _steps(cluster, "decode-0") > 0 and _steps(cluster, "decode-1") > 0  # through both instances
        deleted = _a_deleted_decode_pod_finishes_its_stream_and_new_requests_go_elsewhere(cluster, client)
        record_property("late_instance_first_request_s", _created_again_it_gets_requests(cluster, client, deleted))
        record_property("restarted_shard_first_read_s", _a_restarted_shard_is_read_again(cluster, client))
    finally:
        cluster.stop()


LONG = 200


def _a_deleted_decode_pod_finishes_its_stream_and_new_requests_go_elsewhere(cluster: LocalCluster,
                                                                             client: openai.OpenAI) -> str:
    migrations = lambda: _metric(cluster, "gateway-0", r"cmx_request_migrations_total\{[^}]*\}")  # noqa: E731
    before = migrations()
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(_stream, client, PROMPTS[0], LONG, started)
        assert started.wait(timeout=120)
        serving = [pod for pod in ("decode-0", "decode-1") if _running(cluster, pod)]
        assert len(serving) == 1, serving
        deleted, other = serving[0], ({"decode-0", "decode-1"} - set(serving)).pop()
        steps = _steps(cluster, other)
        deletion = pool.submit(cluster.delete_pod, deleted)
        target = cluster.container(deleted, "decode").grpc_target()
        while health_check_sync(target) == "SERVING":  # until its SIGTERM: the drain began
            time.sleep(0.01)
        assert not long.done()  # the stream runs on the pod being deleted
        assert [_stream(client, p) for p in PROMPTS[1:3]] == [(_local_text(cluster, p), MAX_TOKENS)
                                                              for p in PROMPTS[1:3]]
        assert _steps(cluster, other) > steps  # the new requests went to the other instance
        assert long.result(timeout=300) == (_local_text(cluster, PROMPTS[0], LONG), LONG)
        assert deletion.result(timeout=300) == ["decode", "die-1", "die-0", "fabric"]  # Kubernetes' order
    assert migrations() == before  # the stream finished where it ran: no re-prefill elsewhere
    return deleted


def _created_again_it_gets_requests(cluster: LocalCluster, client: openai.OpenAI, pod: str) -> float:
    """The seconds from the pod's SERVING to its first engine step."""
    cluster.start_pod(pod)
    serving = _serving_at(cluster, pod)
    first = _until(lambda: _steps(cluster, pod) > 0, client)
    return round(first - serving, 2)


def _a_restarted_shard_is_read_again(cluster: LocalCluster, client: openai.OpenAI) -> float:
    """The seconds from a kvcache pod's SERVING (deleted and created again) to its first Get."""
    cluster.delete_pod("kvcache-1")
    cluster.start_pod("kvcache-1")
    serving = _serving_at(cluster, "kvcache-1")
    reads = lambda: _metric(cluster, "kvcache-1", r"cmx_kvcache_(?:hits|misses)_total")  # noqa: E731
    first = _until(lambda: reads() > 0, client)
    return round(first - serving, 2)
