"""Kubernetes manifests: well-formed, probes on the gRPC port, and every env var a valid config field."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from cloudmatrix.config import load_config
from cloudmatrix.service_main import env_prefix

K8S = Path(__file__).resolve().parents[1] / "k8s"


def _workloads():
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("Deployment", "StatefulSet"):
                yield path.name, doc


@pytest.mark.parametrize("name,doc", list(_workloads()), ids=lambda v: v if isinstance(v, str) else "")
def test_workload_env_is_accepted_by_the_service_config(name, doc):
    container = doc["spec"]["template"]["spec"]["containers"][0]
    service = container["command"][-1].removeprefix("services.")
    config_module = importlib.import_module(f"services.{service}.config")
    config_cls = next(v for k, v in vars(config_module).items() if k.endswith("Config") and k != "ServerConfig")
    env = {e["name"]: e.get("value", "1") for e in container["env"]}  # fieldRef values are pod ordinals
    config = load_config(config_cls, env=env, env_prefix=env_prefix(service))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.server.port == ports["grpc"] and config.server.metrics_port == ports["metrics"]
    assert config.server.host == "0.0.0.0"
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > config.server.grace_s


def test_npu_statefulset_dies_match_replicas():
    name, doc = next((n, d) for n, d in _workloads() if d["metadata"]["name"] == "npu-emulator")
    env = {e["name"]: e for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert int(env["CMX_NPU_EMULATOR__NUM_DIES"]["value"]) == doc["spec"]["replicas"]
    assert "pod-index" in env["CMX_NPU_EMULATOR__DIE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
