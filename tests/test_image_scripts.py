"""The pieces of `make image` and `make test-k8s-podman` that need no podman (docs/kubernetes-image.md):
the converter from the rendered overlay's workloads to the Pods podman plays, on the dev overlay and
on both shapes of an instance pod (dies and fabric as containers, or as native sidecars), the local
package index the image build installs torch from, and the Dockerfile's BASE argument."""
from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from tests.k8s_render import ROOT, rendered


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"cmx_image_{name}", ROOT / "scripts" / "image" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


kube_pods = _load("kube_pods")
simple_index = _load("simple_index")
HOST = Path("/srv/pods")


@pytest.fixture(scope="module")
def dev_plans():
    return {p.name: p for p in kube_pods.pod_plans(list(rendered("dev")), HOST)}


def _spec(plan):
    return plan.manifest["spec"]


def test_every_replica_of_every_workload_is_one_pod_with_its_statefulset_index(dev_plans):
    objects = rendered("dev")
    expected = {f"{w['metadata']['name']}-{i}" for w in kube_pods.workloads(objects)
                for i in range(w["spec"].get("replicas", 1))}
    assert set(dev_plans) == expected and {"kvcache-0", "kvcache-1", "gateway-0"} <= expected
    for index in (0, 1):
        plan = dev_plans[f"kvcache-{index}"]
        assert plan.manifest["metadata"]["labels"][kube_pods.POD_INDEX_LABEL] == str(index)
        args = _spec(plan)["containers"][0]["args"]
        assert args[args.index("--index") + 1] == str(index)  # $(POD_INDEX) from the fieldRef
        assert f"kvcache-{index}.kvcache" in plan.aliases and "kvcache" in plan.aliases
    assert kube_pods.POD_INDEX_LABEL not in dev_plans["gateway-0"].manifest["metadata"]["labels"]
    assert "prefill" in dev_plans["prefill-0"].aliases  # the gateway's dns:///prefill:50051 finds it


def test_native_sidecars_become_containers_and_ordinary_init_containers_stay(dev_plans):
    for workload in kube_pods.workloads(rendered("dev")):
        spec = workload["spec"]["template"]["spec"]
        inits = spec.get("initContainers", [])
        sidecars = [c["name"] for c in inits if c.get("restartPolicy") == "Always"]
        plain = [c["name"] for c in inits if c.get("restartPolicy") != "Always"]
        for i in range(workload["spec"].get("replicas", 1)):
            played = _spec(dev_plans[f"{workload['metadata']['name']}-{i}"])
            assert [c["name"] for c in played.get("initContainers", [])] == plain
            assert [c["name"] for c in played["containers"]] == sidecars + [c["name"] for c in spec["containers"]]


@pytest.mark.parametrize("shape", ["containers", "sidecars"])
def test_an_instance_pod_plays_the_same_whether_its_dies_are_containers_or_native_sidecars(shape):
    objects = copy.deepcopy(list(rendered("dev")))
    prefill = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "prefill")
    spec = prefill["spec"]["template"]["spec"]
    helpers = [c for c in [*spec.get("initContainers", []), *spec["containers"]]
               if c["name"].startswith(("die-", "fabric"))]
    main = [c for c in spec["containers"] if c not in helpers]
    quantize = [c for c in spec.get("initContainers", []) if c not in helpers]
    for c in helpers:
        c.pop("restartPolicy", None)
        if shape == "sidecars":
            c["restartPolicy"] = "Always"
    spec["initContainers"] = quantize + (helpers if shape == "sidecars" else [])
    spec["containers"] = main + ([] if shape == "sidecars" else helpers)
    plan = next(p for p in kube_pods.pod_plans(objects, HOST) if p.name == "prefill-0")
    assert [c["name"] for c in _spec(plan)["initContainers"]] == ["quantize"]
    assert {c["name"] for c in _spec(plan)["containers"]} == {"prefill", "fabric", "die-0", "die-1"}
    assert all("restartPolicy" not in c for c in _spec(plan)["containers"])
    assert set(plan.probes) == {"prefill", "fabric", "die-0", "die-1"}


def test_security_contexts_are_kept_and_nothing_is_pulled_published_or_left_unresolved(dev_plans):
    for plan in dev_plans.values():
        spec = _spec(plan)
        assert spec["securityContext"]["runAsNonRoot"] is True and plan.user == (10001, 10001)
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert c["imagePullPolicy"] == "Never" and c["image"] == "cloudmatrix-infer:0.1.0"
            assert not {"ports", "readinessProbe", "livenessProbe", "startupProbe", "envFrom"} & set(c)
            assert "$(" not in str([c.get("command"), c.get("args"), c.get("env")])
            assert all(set(e) == {"name", "value"} for e in c.get("env", []))
        assert spec["restartPolicy"] == "OnFailure"


def test_every_volume_is_a_directory_of_its_own_pod_with_the_configmap_files(dev_plans):
    topology = next(o for o in rendered("dev") if o["kind"] == "ConfigMap"
                    and o["metadata"]["name"].startswith("cmx-topology"))["data"]["topology.yaml"]
    for name, plan in dev_plans.items():
        volumes = _spec(plan)["volumes"]
        assert all(v["hostPath"]["path"] == str(HOST / name / "volumes" / v["name"]) for v in volumes)
        assert {v["name"] for v in volumes} == set(plan.volumes)
        assert plan.volumes["topology"] == {"topology.yaml": topology} and plan.volumes["tmp"] == {}
    assert "data" in dev_plans["kvcache-1"].volumes  # from the volumeClaimTemplates
    assert dev_plans["gateway-0"].ports["http"] == 8000


def test_the_local_index_lists_each_wheel_under_its_normalized_project(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    for name in ("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", "typing_extensions-4.16.0-py3-none-any.whl",
                 "MarkupSafe-3.0.4-cp311-cp311-manylinux_2_28_x86_64.whl"):
        (files / name).write_bytes(b"")
    assert set(simple_index.write_index(tmp_path)) == {"torch", "typing-extensions", "markupsafe"}
    page = (tmp_path / "simple" / "torch" / "index.html").read_text()
    assert 'href="../../files/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"' in page


def test_the_dockerfile_base_defaults_to_the_slim_python_image_for_both_stages():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"(?m)^ARG BASE=python:3\.11-slim$", dockerfile)
    assert re.findall(r"(?m)^FROM (\S+)", dockerfile) == ["${BASE}", "${BASE}"]
