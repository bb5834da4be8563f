"""k8s/: every overlay renders (kubectl kustomize) and every object passes offline schema
validation; policies hold on every workload (probes, limits, non-root, read-only root, dropped
capabilities, network policies); the topology ConfigMap agrees with the objects, and each
container's settings (its topology entry, then its env) make a valid service config."""
from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest
import yaml

from cloudmatrix.config import load_config
from cloudmatrix.launcher.topology import entry_settings, load_topology, parse_topology
from cloudmatrix.rpc.addresses import expand_addresses
from cloudmatrix.service_main import env_prefix
from tests.k8s_render import (
    K8S,
    OVERLAYS,
    ROOT,
    arg,
    by_kind,
    env_of,
    pod_spec,
    render,
    rendered,
    running,
    service_of,
    sidecars,
    topology_of,
    validate,
    workloads,
)

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_every_overlay_passes_schema_validation(overlay):
    objects = rendered(overlay)
    assert {"StatefulSet", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "ConfigMap"} <= \
        {o["kind"] for o in objects}
    for obj in objects:
        validate(obj)  # strict: an unknown or misspelled field fails


def test_validation_refuses_what_the_schemas_forbid():
    """The checker itself can fail: a misspelled field, a wrong type, a bad custom resource."""
    statefulset = next(o for o in rendered("dev") if o["kind"] == "StatefulSet")
    bad = yaml.safe_load(yaml.safe_dump(statefulset))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(Exception, match="prot"):
        validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(statefulset))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(Exception):
        validate(bad)
    monitor = next(o for o in rendered("supernode-slice") if o["kind"] == "PodMonitor")
    bad = yaml.safe_load(yaml.safe_dump(monitor))
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(Exception, match="intervall"):
        validate(bad)
    with pytest.raises(Exception):
        validate({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}})


def _containers(workload: dict, init: bool = True) -> list[dict]:
    spec = pod_spec(workload)
    return [*spec["containers"], *(spec.get("initContainers", ()) if init else ())]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_read_only_with_no_capabilities_and_bounded_resources(overlay):
    for workload in workloads(rendered(overlay)):
        spec, name = pod_spec(workload), workload["metadata"]["name"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for container in _containers(workload):
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory", "ephemeral-storage"} <= set(container["resources"][bound]), (where, bound)
            writable = {m["mountPath"] for m in container.get("volumeMounts", ()) if not m.get("readOnly")}
            assert "/tmp" in writable, where  # the read-only root leaves Python a writable /tmp
        # every scratch volume is bounded, and the pod's ephemeral-storage limit (its containers'
        # sum, which emptyDir usage counts against) holds all of them at once
        scratch = [v["emptyDir"] for v in spec.get("volumes", ()) if "emptyDir" in v]
        assert all("sizeLimit" in v for v in scratch), name
        limit = sum(_bytes(c["resources"]["limits"]["ephemeral-storage"]) for c in running(spec))
        assert sum(_bytes(v["sizeLimit"]) for v in scratch) <= limit, name


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_kvcache_disk_tier_fits_its_volume(overlay):
    """Evictions start before the volume is full: the disk tier's capacity (its topology entry, or
    the service default) at most 90% of the StatefulSet's volume claim."""
    from services.kvcache.config import KvCacheConfig

    objects = rendered(overlay)
    entry = next(e for e in topology_of(objects)["services"] if e["name"] == "kvcache")
    capacity = int(entry.get("set", {}).get("disk_capacity_bytes", KvCacheConfig.disk_capacity_bytes))
    claim = by_kind(objects, "StatefulSet")["kvcache"]["spec"]["volumeClaimTemplates"][0]
    assert capacity <= 0.9 * _bytes(claim["spec"]["resources"]["requests"]["storage"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_container_has_grpc_probes_on_its_own_port_and_drains_within_the_grace_period(overlay):
    for workload in workloads(rendered(overlay)):
        spec, name = pod_spec(workload), workload["metadata"]["name"]
        names = [c["name"] for c in _containers(workload)]
        ports = [p for c in running(spec) for p in c.get("ports", ())]
        assert len(set(names)) == len(names), name  # one network per pod: names and ports unique
        assert len({p["name"] for p in ports}) == len(ports) == len({p["containerPort"] for p in ports}), name
        drains = {}
        for container in running(spec):
            where, env = f"{name}/{container['name']}", env_of(container)
            prefix = env_prefix(service_of(container))
            grpc_port = int(env[f"{prefix}__SERVER__PORT"])
            own = {p["containerPort"] for p in container["ports"]}
            assert grpc_port in own and int(env[f"{prefix}__SERVER__METRICS_PORT"]) in own, where
            assert env[f"{prefix}__SERVER__HOST"] == "0.0.0.0", where
            assert container["readinessProbe"]["grpc"] == {"port": grpc_port}, where
            for probe in ("startupProbe", "livenessProbe"):  # alive while loading or while a die is away
                assert container[probe]["grpc"] == {"port": grpc_port, "service": "liveness"}, (where, probe)
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            drains[container["name"]] = float(env[f"{prefix}__SERVER__GRACE_S"]) + (float(pre_stop[1]) if pre_stop else 0)
        # the main containers drain at once, then the sidecars one after another in reverse order
        main = max(drains[c["name"]] for c in spec["containers"])
        assert spec["terminationGracePeriodSeconds"] > main + sum(drains[c["name"]] for c in sidecars(spec)), name


def test_the_dies_and_the_fabric_are_native_sidecars_started_before_and_stopped_after_their_instance():
    """Kubernetes stops a pod's main containers first and its sidecars after they have exited, so
    an instance's drain still has its dies and its fabric; the fabric starts first (the dies join
    it) and so stops last."""
    for overlay in OVERLAYS:
        for tier in ("prefill", "decode"):
            spec = pod_spec(by_kind(rendered(overlay), "StatefulSet")[tier])
            assert [service_of(c) for c in spec["containers"]] == [tier]
            services = [service_of(c) for c in sidecars(spec)]
            assert services[0] == "ub_fabric" and set(services[1:]) == {"npu_emulator"} and len(services) > 2
            assert spec["initContainers"][0]["name"] == "quantize"  # the model, before any die loads it
            assert "restartPolicy" not in spec["initContainers"][0]


def _reachable_from_outside(objects, labels: dict) -> set:
    """The ports (names; "*" for all) a pod with ``labels`` accepts from outside its namespace,
    by the NetworkPolicies that select it (none selecting it: everything)."""
    selecting = [p for p in by_kind(objects, "NetworkPolicy").values()
                 if "Ingress" in p["spec"]["policyTypes"]
                 and p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()]
    if not selecting:
        return {"*"}
    ports: set = set()
    for policy in selecting:
        for rule in policy["spec"].get("ingress", ()):
            sources = rule.get("from")
            if sources is None or any("namespaceSelector" in s or "ipBlock" in s for s in sources):
                ports |= {p["port"] for p in rule.get("ports", ())} or {"*"}
    return ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateways_http_port_is_reachable_from_outside_the_namespace(overlay):
    objects = rendered(overlay)
    monitoring = {"metrics", "fabric-metrics", *(f"die{i}-metrics" for i in range(4))}
    for workload in workloads(objects):
        name = workload["metadata"]["name"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        outside = _reachable_from_outside(objects, labels)
        expected = {"http"} if name == "gateway" else set()
        if any(o["kind"] == "PodMonitor" for o in objects):  # Prometheus (any namespace) scrapes metrics
            expected |= monitoring
        assert outside == expected, (name, outside)


def test_the_network_policy_check_sees_an_open_pod():
    objects = [o for o in rendered("dev") if o["metadata"]["name"] != "default-deny-ingress"]
    allow_all = {"kind": "NetworkPolicy", "metadata": {"name": "open"},
                 "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}}
    assert _reachable_from_outside([*objects, allow_all], {"app.kubernetes.io/name": "kvcache"}) == {"*"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_gets_a_valid_config_from_its_topology_entry_and_env(overlay, tmp_path):
    objects = rendered(overlay)
    topology_file = tmp_path / "topology.yaml"
    topology_file.write_text(yaml.safe_dump(topology_of(objects)))
    for workload in workloads(objects):
        for container in running(pod_spec(workload)):
            service = service_of(container)
            entry, index = arg(container, "--entry"), arg(container, "--index", "0").replace("$(POD_INDEX)", "1")
            config_path, base = entry_settings(topology_file, entry, int(index), service)
            module = importlib.import_module(f"services.{service}.config")
            config_cls = next(v for k, v in vars(module).items() if k.endswith("Config") and k != "ServerConfig")
            env = {k: re.sub(r"\$\((\w+)\)", "pod-1", v) for k, v in env_of(container).items()}
            config = load_config(config_cls, path=config_path, env=env, env_prefix=env_prefix(service), base=base)
            assert config.server.host == "0.0.0.0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_topology_configmap_agrees_with_the_objects(overlay):
    objects = rendered(overlay)
    raw = topology_of(objects)
    parse_topology(raw, Path("."))  # the schema of topologies/*.yaml
    entries = {e["name"]: e for e in raw["services"]}
    count = {name: e.get("count", 1) for name, e in entries.items()}
    sets = {name: e.get("set", {}) for name, e in entries.items()}
    statefulsets, deployments = by_kind(objects, "StatefulSet"), by_kind(objects, "Deployment")
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    replicas = {n: w["spec"]["replicas"] if n not in hpas else hpas[n]["spec"]["minReplicas"]
                for n, w in {**statefulsets, **deployments}.items()}  # an HPA's target starts at its minimum
    assert count["kvcache"] == replicas["kvcache"]
    grpc_port = 50051
    # the pool's members are the kvcache headless Service's records, each shard named by its pod
    pool = f"dns:///{statefulsets['kvcache']['spec']['serviceName']}:{grpc_port}"
    assert sets["kvcache"]["members"] == pool
    kvcache = running(pod_spec(statefulsets["kvcache"]))[0]
    assert env_of(kvcache)["CMX_KVCACHE__ADVERTISE"] == f"$(POD_NAME).kvcache:{grpc_port}"
    for tier in ("prefill", "decode"):
        containers = running(pod_spec(statefulsets[tier]))
        assert count[tier] == replicas[tier] and sets[tier]["kvcache"] == pool
        dies = [c for c in containers if service_of(c) == "npu_emulator"]
        fabrics = [c for c in containers if service_of(c) == "ub_fabric"]
        assert len(dies) == count[f"{tier}-die"] and len(fabrics) == count["fabric"] == 1
        assert {arg(c, "--entry") for c in dies} == {f"{tier}-die"}
        die_ports = [int(env_of(c)["CMX_NPU_EMULATOR__SERVER__PORT"]) for c in dies]
        assert expand_addresses([sets[tier]["dies"]], "dies") == tuple(f"localhost:{p}" for p in die_ports)
        assert sets[tier]["fabric"] == f"localhost:{env_of(fabrics[0])['CMX_UB_FABRIC__SERVER__PORT']}"
        # the gateway finds the tier's instances in its headless Service's records: its ready pods
        service = by_kind(objects, "Service")[statefulsets[tier]["spec"]["serviceName"]]
        assert sets["gateway"][tier] == f"dns:///{service['metadata']['name']}:{grpc_port}"
        assert service["spec"]["clusterIP"] == "None" and not service["spec"].get("publishNotReadyAddresses")
        assert service["spec"]["selector"].items() <= statefulsets[tier]["spec"]["template"]["metadata"]["labels"].items()
        assert {"name": "grpc", "port": grpc_port, "targetPort": "grpc"} in service["spec"]["ports"]
    assert count["gateway"] == replicas["gateway"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_finds_the_podmonitor_and_its_pods_may_scrape_from_any_namespace(overlay):
    """kube-prometheus-stack selects PodMonitors by its release label; the metrics ports admit the
    Prometheus pods by their own label, not a namespace that must be called "monitoring"."""
    objects = rendered(overlay)
    monitors = by_kind(objects, "PodMonitor")
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    for monitor in monitors.values():
        assert "release" in monitor["metadata"].get("labels", {})
    peers = [peer for p in policies for rule in p["spec"].get("ingress", ()) for peer in rule.get("from", ())]
    assert not any("kubernetes.io/metadata.name" in peer.get("namespaceSelector", {}).get("matchLabels", {})
                   for peer in peers)
    if monitors:
        assert any(peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "prometheus"
                   for peer in peers)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_workload_an_hpa_scales_carries_no_replicas_of_its_own(overlay):
    """The HPA owns the count; a `replicas:` re-applied by a GitOps tool would fight it."""
    objects = rendered(overlay)
    workloads_by_name = {**by_kind(objects, "StatefulSet"), **by_kind(objects, "Deployment")}
    for hpa in by_kind(objects, "HorizontalPodAutoscaler").values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] in workloads_by_name and "replicas" not in workloads_by_name[target["name"]]["spec"]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_dev_overlay_has_the_local_default_topologys_entries_counts_and_settings():
    local = load_topology(ROOT / "topologies" / "local.yaml")
    raw_local = yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text())
    raw_k8s = topology_of(rendered("dev"))
    assert [(e["name"], e["service"], e.get("count", 1)) for e in raw_k8s["services"]] == \
        [(e["name"], e["service"], e.get("count", 1)) for e in raw_local["services"]]
    assert len(local.processes) == sum(e.get("count", 1) for e in raw_k8s["services"])
    for ours, theirs in zip(raw_k8s["services"], raw_local["services"]):
        for key, value in theirs.get("set", {}).items():
            if "{addresses:" in str(value) or "{endpoints:" in str(value):
                continue  # `cmx up` fills in addresses; Kubernetes names them
            assert Path(str(ours["set"][key])).name == Path(str(value)).name, (ours["name"], key)


def test_the_old_flat_manifests_are_gone_and_the_image_is_multi_stage_and_non_root():
    assert not list(K8S.glob("*.yaml"))  # one source of truth: base, components, overlays
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"(?m)^FROM ", dockerfile)[1:]
    assert len(stages) >= 2, "a build stage and a final stage"
    final = stages[-1]
    user = re.findall(r"(?m)^USER (\S+)", final)
    assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) > 0
    assert not re.search(r"gcc|build-essential|apt-get install", final)
    assert "torch==2.13.0" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    used = {c["image"] for o in rendered("dev") if o["kind"] in ("Deployment", "StatefulSet")
            for c in _containers(o)}
    assert used == {"cloudmatrix-infer:0.1.0"}


def test_scaling_the_pool_or_an_instance_tier_changes_no_other_object(tmp_path):
    """Nothing lists the shards or the instances (the pool and the gateway find them in their
    headless Services' records), so a scale is one number: no other pod template changes, and no
    other pod restarts."""
    base = rendered("dev")
    for workload in ("kvcache", "decode", "prefill"):
        overlay = tmp_path / workload
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [{os.path.relpath(K8S / 'overlays' / 'dev', overlay)}]\n"
            f"replicas: [{{name: {workload}, count: 3}}]\n")
        scaled = render(overlay)
        changed = [(a["kind"], a["metadata"]["name"]) for a, b in zip(base, scaled) if a != b]
        assert len(base) == len(scaled) and changed == [("StatefulSet", workload)]
        before, after = (next(o for o in objs if o["metadata"]["name"] == workload and o["kind"] == "StatefulSet")
                         for objs in (base, scaled))
        assert before["spec"]["template"] == after["spec"]["template"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shards_and_gateways_spread_over_nodes_and_zones(overlay):
    """Both replicas of a block (R = 2) on one node would go together; so would every gateway."""
    for name in ("kvcache", "gateway"):
        workload = {**by_kind(rendered(overlay), "StatefulSet"), **by_kind(rendered(overlay), "Deployment")}[name]
        spec, own = pod_spec(workload), workload["spec"]["template"]["metadata"]["labels"]
        keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]
                if c["labelSelector"]["matchLabels"].items() <= own.items() and c["maxSkew"] == 1}
        assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys, name
        [term] = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= own.items()
