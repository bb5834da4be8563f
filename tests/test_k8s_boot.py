"""Boot from the manifests: the dev overlay, rendered by kustomize, runs as local processes with
each container's command, args, env and ports exactly as its object gives them (tests/k8s_pods.py
stands in for the pod network, DNS and volumes), and serves streamed completions through the
gateway to the official openai client: the local engine's tokens, from the checkpoint the pods'
init containers made. Once as it is, and once with the decode StatefulSet patched to 2 replicas
(one number, as an overlay would), where both decode instances serve. Drift between the manifests
and the code fails here."""
from __future__ import annotations

import os
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from cloudmatrix.checkpoints import load_for_precision
from cloudmatrix.model.generate import generate
from cloudmatrix.model.precision import parse_precision
from cloudmatrix.model.tokenizer import TextTokenizer
from cloudmatrix.sampling_params import SamplingParams
from tests.k8s_pods import LocalCluster
from tests.k8s_render import K8S, render, rendered

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


def _stream(client: openai.OpenAI, prompt: str) -> tuple[str, int]:
    stream = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    text, tokens = "", 0
    for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    return text, tokens


def _local_text(cluster: LocalCluster, prompt: str) -> str:
    """The local engine's greedy text on the checkpoint the gateway pod's init containers made."""
    checkpoint = cluster.pod("gateway-0").root / "volumes" / "models" / "cmx-tiny-py-int8"
    model = load_for_precision(checkpoint, parse_precision("int8-pasa"))
    tokenizer = TextTokenizer.load(checkpoint)
    ids = generate(model, tokenizer.encode(prompt), SamplingParams(max_tokens=MAX_TOKENS), ignore_eos=True)
    return tokenizer.decode(list(ids))


def _steps(cluster: LocalCluster, pod: str) -> float:
    """Engine steps the instance in ``pod`` has run, from its /metrics."""
    container = cluster.container(pod, pod.rsplit("-", 1)[0])
    with urllib.request.urlopen(f"http://{container.pod.ip}:{container.port('metrics')}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(r"(?m)^cmx_engine_step_seconds_count\{[^}]*\} (\S+)$", text))


def test_the_dev_overlay_boots_from_its_manifests_and_serves_a_streamed_completion(tmp_path):
    cluster = _boot(list(rendered("dev")), tmp_path)
    try:
        assert {p.name for p in cluster.pods} == {"kvcache-0", "kvcache-1", "prefill-0", "decode-0", "gateway-0"}
        text, tokens = _stream(_client(cluster), PROMPTS[0])
        assert tokens == MAX_TOKENS and text == _local_text(cluster, PROMPTS[0])
        assert _client(cluster).models.list().data[0].trained is True  # the shipped model's INT8 copy
    finally:
        cluster.stop()


def test_with_the_decode_replicas_patched_to_2_both_decode_instances_serve(tmp_path):
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
    finally:
        cluster.stop()
