"""Run a rendered overlay's pods as local processes, so a test can prove the manifests start a
working system: every container is launched with the command, args, env and ports its object gives
it, and nothing else.

What stands in for the cluster:
- pod network: every pod gets its own loopback address, 127.77.<workload>.<ordinal + 1>, which its
  containers bind (0.0.0.0) and reach each other on (localhost), on the manifests' own ports;
- DNS: a StatefulSet pod's name ``<set>-<n>.<service>`` (and a ``<set>-{a..b}.<service>`` range of
  them) is that pod's address; a headless Service's records (``dns:///<service>:<port>``) are its
  ready pods, which the harness keeps as ready files (the local launcher's format, read by
  ``ready:`` sources: rpc/discovery.py) in ``<root>/endpoints/<port>/``, written when every
  container of a pod answers its readiness probe and removed when the pod is being deleted, as the
  endpoints controller does;
- volumes: a directory per volume per pod (emptyDir, PVC, or a ConfigMap's files), at the path it
  is mounted on, found by prefix in env values, args and the topology file;
- image files: what the Dockerfile's final stage COPYs from the build context (the shipped model)
  is that path of this checkout;
- env: ``value`` with ``$(VAR)`` expansion, ``fieldRef`` (the pod's name, ordinal label, IP) and
  ``envFrom`` ConfigMaps; ``python`` and ``cmx`` are this interpreter's.
Init containers run first, in order, per pod (pods in parallel): an ordinary one to completion, a
native sidecar (restartPolicy Always) until its startup probe passes, and it keeps running; then
every container starts. Deleting a pod follows Kubernetes' order: out of the endpoints, SIGTERM to
the containers, and once they have exited the sidecars one by one in reverse order, SIGKILL for
what is left at terminationGracePeriodSeconds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from cloudmatrix.rpc.channel import health_check_sync
from tests.k8s_render import pod_spec, running, workloads

POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
ROOT = Path(__file__).resolve().parents[1]


def image_files(dockerfile: Path = ROOT / "Dockerfile") -> list[tuple[str, Path]]:
    """(path in the image, path in this checkout) for each ``COPY src dst`` of the final stage
    that copies from the build context (not ``--from`` another stage)."""
    final = dockerfile.read_text().split("\nFROM ")[-1]
    copies = re.findall(r"(?m)^COPY\s+(?!--)(\S+)\s+(\S+)\s*$", final)
    return [(dst.rstrip("/"), ROOT / src) for src, dst in copies]
_VAR = re.compile(r"\$\((\w+)\)")


@dataclasses.dataclass
class Container:
    pod: Pod
    spec: dict
    proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"{self.pod.name}/{self.spec['name']}"

    @property
    def log(self) -> Path:
        return self.pod.root / f"{self.spec['name']}.log"

    def grpc_target(self) -> str:
        return f"{self.pod.ip}:{self.spec['readinessProbe']['grpc']['port']}"

    @property
    def sidecar(self) -> bool:
        return self.spec.get("restartPolicy") == "Always"

    def ready(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and \
            health_check_sync(self.grpc_target(), timeout=1.0) == "SERVING"

    def port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.spec["ports"] if p["name"] == name)


@dataclasses.dataclass
class Pod:
    name: str
    index: int
    ip: str
    workload: dict
    root: Path
    terminating: bool = False
    generation: int = 0  # one more each time the pod is created again

    @property
    def spec(self) -> dict:
        return pod_spec(self.workload)

    @property
    def ports(self) -> list[int]:
        return [p["containerPort"] for c in running(self.spec) for p in c.get("ports", ())]


class LocalCluster:
    def __init__(self, objects: list[dict], root: Path) -> None:
        self.objects, self.root = objects, root
        self.config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        self.endpoints = root / "endpoints"
        self._sets = {w["spec"]["serviceName"]: w["metadata"]["name"] for w in workloads(objects)
                      if w["kind"] == "StatefulSet"}
        self._watch: threading.Thread | None = None
        self._stopping = threading.Event()
        self._endpoints_lock = threading.Lock()  # a deleted pod's records never come back
        self.pods: list[Pod] = []
        self._names: list[tuple[re.Pattern, str]] = []  # pod DNS names -> addresses
        for k, workload in enumerate(workloads(objects), start=1):
            name = workload["metadata"]["name"]
            for i in range(workload["spec"].get("replicas", 1)):
                pod_name = f"{name}-{i}"
                self.pods.append(Pod(pod_name, i, f"127.77.{k}.{i + 1}", workload, root / pod_name))
            if workload["kind"] == "StatefulSet":
                self._names.append((re.compile(
                    rf"\b{re.escape(name)}-(?:\{{(\d+)\.\.(\d+)\}}|(\d+))\.{re.escape(workload['spec']['serviceName'])}"
                    r"(?:\.[a-z0-9-]+)?(?:\.svc(?:\.cluster\.local)?)?\b"), f"127.77.{k}."))
        self.containers = [Container(pod, spec) for pod in self.pods for spec in running(pod.spec)]

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def container(self, pod: str, name: str) -> Container:
        return next(c for c in self.containers if c.pod.name == pod and c.spec["name"] == name)

    def of(self, pod: Pod) -> list[Container]:
        """The pod's running containers: sidecars in start order, then its containers."""
        return [c for c in self.containers if c.pod is pod]

    # -- how one pod sees the world ------------------------------------------------------------

    def _mounts(self, pod: Pod, container: dict) -> list[tuple[str, Path]]:
        """(mount path, local directory) in the container's order. A ConfigMap volume gets a
        directory per container: its files are rewritten with that container's mounts, which it
        alone sees."""
        config_maps = {v["name"] for v in pod.spec.get("volumes", ()) if "configMap" in v}

        def local(name: str) -> Path:
            return pod.root / "volumes" / (f"{name}.{container['name']}" if name in config_maps else name)

        return [*((m["mountPath"], local(m["name"])) for m in container.get("volumeMounts", ())), *image_files()]

    def rewrite(self, pod: Pod, container: dict, value: str) -> str:
        """``value`` as this container sees it: pod names, localhost and mount paths made local."""
        value = re.sub(r"dns:///([a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(\d+)",
                       lambda m: f"ready:{self.endpoints / m[2] / self._sets.get(m[1], m[1])}", value)
        for pattern, prefix in self._names:
            value = pattern.sub(lambda m: prefix + (f"{{{int(m[1]) + 1}..{int(m[2]) + 1}}}" if m[1] else
                                                     str(int(m[3]) + 1)), value)
        value = re.sub(r"\b(localhost|0\.0\.0\.0)\b", pod.ip, value)
        mounts = dict(self._mounts(pod, container))  # one pass: a local path is never rewritten again
        if mounts:
            paths = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
            value = re.sub(rf"(?:^|(?<=[=,\s]))({paths})(?=/|$|[,\s])", lambda m: str(mounts[m[1]]), value)
        return value

    def _volumes(self, pod: Pod, container: dict) -> None:
        """Each volume's directory; a ConfigMap's files, rewritten for this container (a topology
        file names addresses and paths)."""
        sources = {v["name"]: v for v in pod.spec.get("volumes", ())}
        for mount, (_, local) in zip(container.get("volumeMounts", ()), self._mounts(pod, container)):
            local.mkdir(parents=True, exist_ok=True)
            config_map = sources.get(mount["name"], {}).get("configMap")
            if config_map:
                for key, text in self.config_maps[config_map["name"]]["data"].items():
                    (local / key).write_text(self._rewrite_yaml(pod, container, text))

    def _rewrite_yaml(self, pod: Pod, container: dict, text: str) -> str:
        def walk(node):
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            return self.rewrite(pod, container, node) if isinstance(node, str) else node
        return yaml.safe_dump(walk(yaml.safe_load(text)), sort_keys=False)

    def _env(self, pod: Pod, container: dict) -> dict[str, str]:
        env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
               "HOME": str(pod.root / "home"), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        for source in container.get("envFrom", ()):
            ref = source.get("configMapRef", {})
            if ref.get("name") in self.config_maps:
                env.update(self.config_maps[ref["name"]]["data"])
            elif not ref.get("optional"):
                raise KeyError(f"{pod.name}/{container['name']}: envFrom ConfigMap {ref.get('name')} is missing")
        for item in container.get("env", ()):
            if "value" in item:
                value = _VAR.sub(lambda m: env.get(m[1], m[0]), item["value"])
            else:
                value = self._field(pod, item["valueFrom"]["fieldRef"]["fieldPath"])
            env[item["name"]] = self.rewrite(pod, container, value)
        return env

    @staticmethod
    def _field(pod: Pod, path: str) -> str:
        fields = {"metadata.name": pod.name, f"metadata.labels['{POD_INDEX_LABEL}']": str(pod.index),
                  "status.podIP": pod.ip}
        return fields[path]

    def _argv(self, pod: Pod, container: dict, env: dict[str, str]) -> list[str]:
        argv = [_VAR.sub(lambda m: env.get(m[1], m[0]), a) for a in [*container["command"], *container.get("args", ())]]
        local = {"python": sys.executable, "cmx": str(Path(sys.executable).parent / "cmx")}
        return [local.get(argv[0], argv[0]), *(self.rewrite(pod, container, a) for a in argv[1:])]

    def _popen(self, pod: Pod, container: dict) -> subprocess.Popen:
        self._volumes(pod, container)
        (pod.root / "home").mkdir(parents=True, exist_ok=True)
        env = self._env(pod, container)
        log = open(pod.root / f"{container['name']}.log", "w")  # noqa: SIM115 - the process owns it
        try:
            return subprocess.Popen(self._argv(pod, container, env), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=pod.root / "home", start_new_session=True)
        finally:
            log.close()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, init_timeout_s: float = 300.0) -> None:
        """Every pod (in parallel), then the endpoints controller."""
        with ThreadPoolExecutor(len(self.pods)) as pool:
            list(pool.map(lambda pod: self.start_pod(pod.name, init_timeout_s), self.pods))
        self._watch = threading.Thread(target=self._endpoints_controller, daemon=True)
        self._watch.start()

    def start_pod(self, name: str, init_timeout_s: float = 300.0) -> None:
        """The pod's init containers in order (a sidecar until its startup probe passes, and on),
        then its containers: a pod created, or created again by its StatefulSet after a delete."""
        pod = self.pod(name)
        with self._endpoints_lock:
            pod.terminating, pod.generation = False, pod.generation + 1
        deadline = time.monotonic() + init_timeout_s
        for spec in pod.spec.get("initContainers", ()):
            if spec.get("restartPolicy") == "Always":
                container = self.container(name, spec["name"])
                container.proc = self._popen(pod, spec)
                self._wait_started(container, deadline)
                continue
            code = self._popen(pod, spec).wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise RuntimeError(f"init container {pod.name}/{spec['name']} exited {code}:\n"
                                   f"{(pod.root / (spec['name'] + '.log')).read_text()[-3000:]}")
        for container in self.of(pod):
            if not container.sidecar:
                container.proc = self._popen(pod, container.spec)

    @staticmethod
    def _wait_started(container: Container, deadline: float) -> None:
        probe = container.spec["startupProbe"]["grpc"]
        target = f"{container.pod.ip}:{probe['port']}"
        while health_check_sync(target, timeout=1.0, service=probe.get("service", "")) != "SERVING":
            if container.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sidecar {container.name} did not start:\n{container.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def wait_ready(self, timeout_s: float, pods: list[str] | None = None, listed: bool = True) -> None:
        """Until every container's readiness probe (gRPC health) answers SERVING, and (``listed``)
        its pod is in the endpoints; a container that exits fails at once, with its log."""
        deadline = time.monotonic() + timeout_s
        waiting = [c for c in self.containers if pods is None or c.pod.name in pods]
        while waiting:
            for container in waiting:
                if container.proc.poll() is not None:
                    raise RuntimeError(f"{container.name} exited {container.proc.returncode}:\n"
                                       f"{container.log.read_text()[-3000:]}")
            waiting = [c for c in waiting if health_check_sync(c.grpc_target(), timeout=1.0) != "SERVING"]
            if not waiting and listed and self._watch is not None:  # ready as the cluster sees it: in the endpoints
                waiting = [c for c in self.containers if (pods is None or c.pod.name in pods)
                           and not all(path.exists() for path in self.endpoint_files(c.pod))][:1]
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s} s: {[c.name for c in waiting]}")
            time.sleep(0.2 if waiting else 0)

    def endpoint_files(self, pod: Pod) -> list[Path]:
        return [self.endpoints / str(port) / f"{pod.name}.json" for port in pod.ports]

    def _endpoints_controller(self) -> None:
        """A pod's records while every container of it is ready and it is not being deleted (a
        pod not ready yet is probed every 0.25 s, a ready one every 2 s)."""
        checked: dict[str, float] = {}
        while not self._stopping.is_set():
            for pod in self.pods:
                files = self.endpoint_files(pod)
                listed = all(path.exists() for path in files)
                if pod.terminating or time.monotonic() - checked.get(pod.name, 0.0) < (2.0 if listed else 0.25):
                    continue
                checked[pod.name] = time.monotonic()
                generation = pod.generation
                ready = all(c.ready() for c in self.of(pod))
                with self._endpoints_lock:  # not a verdict on a pod deleted or created since
                    if generation == pod.generation and not pod.terminating:
                        self._publish(pod, files, ready)
            self._stopping.wait(0.05)

    @staticmethod
    def _publish(pod: Pod, files: list[Path], ready: bool) -> None:
        for path in files:
            if ready and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"host": pod.ip, "port": int(path.parent.name)}))
                tmp.replace(path)
            elif not ready:
                path.unlink(missing_ok=True)

    def delete_pod(self, name: str) -> list[str]:
        """Kubernetes' termination: the pod leaves the endpoints, its containers get SIGTERM, and
        once they have all exited its sidecars get it one by one, last started first; what is still
        running at terminationGracePeriodSeconds is killed. Returns the containers in the order
        they exited (the harness's record of the drain)."""
        pod = self.pod(name)
        with self._endpoints_lock:
            pod.terminating = True
            for path in self.endpoint_files(pod):
                path.unlink(missing_ok=True)
        deadline = time.monotonic() + pod.spec.get("terminationGracePeriodSeconds", 30)
        containers = self.of(pod)
        order: list[str] = []
        main = [c for c in containers if not c.sidecar]
        self._terminate(main, deadline, order)
        for sidecar in reversed([c for c in containers if c.sidecar]):
            self._terminate([sidecar], deadline, order)
        return order

    @staticmethod
    def _terminate(containers: list[Container], deadline: float, order: list[str]) -> None:
        """SIGTERM to ``containers``; each is added to ``order`` when it has exited (killed at
        ``deadline``)."""
        alive = [c for c in containers if c.proc is not None and c.proc.poll() is None]
        for container in alive:
            container.proc.send_signal(signal.SIGTERM)
        while alive:
            for container in [c for c in alive if c.proc.poll() is not None]:
                order.append(container.spec["name"])
                alive.remove(container)
            if alive and time.monotonic() > deadline:
                for container in alive:
                    os.killpg(container.proc.pid, signal.SIGKILL)
                    container.proc.wait(timeout=10)
                    order.append(container.spec["name"])
                alive = []
            time.sleep(0.02 if alive else 0)

    def stop(self) -> None:
        """Every pod deleted (in parallel), each in Kubernetes' order."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.join(timeout=10)
        with ThreadPoolExecutor(max(1, len(self.pods))) as pool:
            list(pool.map(lambda pod: self.delete_pod(pod.name), self.pods))
