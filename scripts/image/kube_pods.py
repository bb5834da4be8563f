"""Turn a rendered overlay's workloads into the Pods a kubelet would run, for ``podman kube play``
(podman 4.3 plays Pods, not StatefulSets or Deployments, and knows no native sidecars).

What each Pod gets, as the kubelet would give it:
- one Pod per replica, named ``<workload>-<n>``; a StatefulSet's pods carry the pod-index and
  pod-name labels, and their DNS names ``<pod>.<serviceName>`` (and ``...<ns>.svc.cluster.local``);
  every Service that selects a pod adds its name (and ``<svc>.<ns>...``) to the pod's names;
- native sidecars (init containers with ``restartPolicy: Always``) become containers of the pod,
  started with it; ordinary init containers stay init containers, in order;
- env: ``envFrom`` ConfigMaps (a missing optional one is skipped), ``fieldRef`` values (the pod's
  name, namespace, labels) and ``$(VAR)`` in env values, command and args, resolved here;
- volumes: every emptyDir, PersistentVolumeClaim (volumeClaimTemplates) and ConfigMap volume becomes
  a hostPath directory of the pod's own (podman 4.3 makes an emptyDir a named volume that pods with
  the same volume name share, and knows no fsGroup); the caller makes the directories, owned by the
  pod's runAsUser and fsGroup, with the ConfigMaps' files in theirs;
- the pod's securityContext and each container's (read-only root filesystem, no privilege
  escalation, capabilities dropped) as they are; probes and lifecycle hooks are left out (podman
  4.3 has no gRPC probes): the caller checks each container's readiness probe itself;
- ports are left out too: podman 4.3 publishes a containerPort that has no hostPort on the host's
  same port (Kubernetes publishes nothing), so two pods with one port clash; PodPlan.ports keeps them.
Images are never pulled: ``imagePullPolicy: Never``. The pod's restartPolicy is OnFailure, not the
workloads' Always: podman 4.3 applies it to init containers too and restarts one that exited 0.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
LEFT_OUT = ("startupProbe", "livenessProbe", "readinessProbe", "lifecycle", "restartPolicy", "ports")
_VAR = re.compile(r"\$\((\w+)\)")


@dataclasses.dataclass
class PodPlan:
    """One pod to play: its manifest, its DNS names, and the host directories its volumes need
    (volume name -> {file name: text} for a ConfigMap's files, {} for an empty directory)."""
    name: str
    manifest: dict
    aliases: list[str]
    volumes: dict[str, dict[str, str]]
    probes: dict[str, int]  # container -> its readiness probe's gRPC port
    ports: dict[str, int]  # port name -> containerPort, over the pod's containers

    @property
    def user(self) -> tuple[int, int]:
        """(runAsUser, fsGroup or runAsGroup) of the pod's securityContext."""
        context = self.manifest["spec"].get("securityContext", {})
        uid = context.get("runAsUser", 0)
        return uid, context.get("fsGroup", context.get("runAsGroup", uid))


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def _selects(service: dict, labels: dict) -> bool:
    selector = service.get("spec", {}).get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _field(path: str, metadata: dict) -> str:
    if path == "metadata.name":
        return metadata["name"]
    if path == "metadata.namespace":
        return metadata.get("namespace", "default")
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match and match[2] in metadata.get(match[1], {}):
        return str(metadata[match[1]][match[2]])
    raise KeyError(f"{metadata['name']}: fieldRef {path} has no value (no status fields before the pod runs)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)``: a defined variable's value; an undefined reference stays as is."""
    return _VAR.sub(lambda m: env.get(m[1], m[0]), text)


def _container(spec: dict, metadata: dict, config_maps: dict[str, dict]) -> dict:
    container = {k: copy.deepcopy(v) for k, v in spec.items() if k not in LEFT_OUT}
    env: dict[str, str] = {}
    for source in container.pop("envFrom", ()):
        ref = source.get("configMapRef", {})
        if ref.get("name") in config_maps:
            env.update({source.get("prefix", "") + k: str(v)
                        for k, v in config_maps[ref["name"]].get("data", {}).items()})
        elif not ref.get("optional"):
            raise KeyError(f"{metadata['name']}/{spec['name']}: envFrom ConfigMap {ref.get('name')} is missing")
    for item in container.pop("env", ()):
        if "value" in item:
            env[item["name"]] = _expand(str(item["value"]), env)
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = _field(item["valueFrom"]["fieldRef"]["fieldPath"], metadata)
        else:
            raise KeyError(f"{metadata['name']}/{spec['name']}: env {item['name']}: only value and fieldRef")
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    for key in ("command", "args"):
        if key in container:
            container[key] = [_expand(str(a), env) for a in container[key]]
    container["imagePullPolicy"] = "Never"
    return container


def _volumes(spec: dict, claims: list[dict], config_maps: dict[str, dict], host_root: Path,
             pod: str) -> tuple[list[dict], dict[str, dict[str, str]]]:
    volumes, dirs = [], {}
    sources = [*spec.get("volumes", ()), *({"name": c["metadata"]["name"], "persistentVolumeClaim": {}}
                                          for c in claims)]
    for volume in sources:
        name = volume["name"]
        if "configMap" in volume:
            source = config_maps.get(volume["configMap"]["name"])
            if source is None:
                raise KeyError(f"{pod}: ConfigMap volume {volume['configMap']['name']} is missing")
            wanted = {i["key"]: i.get("path", i["key"]) for i in volume["configMap"].get("items", ())}
            dirs[name] = {wanted.get(k, k): str(v) for k, v in source.get("data", {}).items()
                          if not wanted or k in wanted}
        elif "emptyDir" in volume or "persistentVolumeClaim" in volume:
            dirs[name] = {}
        else:
            raise ValueError(f"{pod}: volume {name}: only emptyDir, ConfigMap and PVC volumes are played")
        volumes.append({"name": name, "hostPath": {"path": str(host_root / pod / "volumes" / name),
                                                   "type": "Directory"}})
    return volumes, dirs


def pod_plans(objects: list[dict], host_root: Path) -> list[PodPlan]:
    """A PodPlan for every replica of every Deployment and StatefulSet in ``objects``."""
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    services = [o for o in objects if o["kind"] == "Service"]
    plans = []
    for workload in workloads(objects):
        name, namespace = workload["metadata"]["name"], workload["metadata"].get("namespace", "default")
        template = workload["spec"]["template"]
        stateful = workload["kind"] == "StatefulSet"
        for index in range(workload["spec"].get("replicas", 1)):
            pod = f"{name}-{index}"
            labels = dict(template.get("metadata", {}).get("labels", {}))
            if stateful:
                labels.update({POD_INDEX_LABEL: str(index), POD_NAME_LABEL: pod})
            metadata = {"name": pod, "namespace": namespace, "labels": labels,
                        "annotations": dict(template.get("metadata", {}).get("annotations", {}))}
            spec = template["spec"]
            inits = spec.get("initContainers", ())
            sidecars = [c for c in inits if c.get("restartPolicy") == "Always"]
            containers = [_container(c, metadata, config_maps) for c in [*sidecars, *spec["containers"]]]
            volumes, dirs = _volumes(spec, workload["spec"].get("volumeClaimTemplates", []) if stateful else [],
                                     config_maps, host_root, pod)
            pod_spec = {k: copy.deepcopy(v) for k, v in spec.items()
                        if k not in ("initContainers", "containers", "volumes")}
            # podman 4.3 gives init containers the pod's restart policy: under Always an init container
            # that exited 0 is started again, and kube play fails removing it ("cannot remove
            # container ... as it is running"). OnFailure restarts only what fails.
            pod_spec.update({"hostname": pod, "containers": containers, "volumes": volumes,
                             "restartPolicy": "OnFailure"})
            plain_inits = [_container(c, metadata, config_maps) for c in inits if c.get("restartPolicy") != "Always"]
            if plain_inits:
                pod_spec["initContainers"] = plain_inits
            aliases = []
            if stateful:
                pod_spec["subdomain"] = workload["spec"]["serviceName"]
                aliases += _names(f"{pod}.{workload['spec']['serviceName']}", namespace)
            for service in services:
                if _selects(service, labels):
                    aliases += _names(service["metadata"]["name"], namespace)
            probes = {c["name"]: c["readinessProbe"]["grpc"]["port"] for c in [*sidecars, *spec["containers"]]
                      if "grpc" in c.get("readinessProbe", {})}
            ports = {p["name"]: p["containerPort"] for c in [*sidecars, *spec["containers"]]
                     for p in c.get("ports", ()) if "name" in p}
            manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
            plans.append(PodPlan(pod, manifest, list(dict.fromkeys(aliases)), dirs, probes, ports))
    return plans


def _names(name: str, namespace: str) -> list[str]:
    return [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
