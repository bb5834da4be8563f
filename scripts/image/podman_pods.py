"""`make test-k8s-podman`: the dev overlay's pods, from the image `make image` built, played by
`podman kube play` on a podman network, serving a streamed completion through the gateway to the
official openai client (docs/kubernetes-image.md).

Steps, each timed: render the overlay (the venv's kubectl kustomize); turn its workloads into Pods
(scripts/image/kube_pods.py); make each pod's volume directories (owned by its runAsUser and
fsGroup, as the kubelet's fsGroup would) and a podman network whose DNS gives each pod the names the
manifests use; play every pod (in parallel; init containers first, as podman does); wait for every
container's readiness probe (gRPC health at the pod's address); check every container runs as the
pod's non-root user on a read-only root filesystem; stream a completion through the gateway;
tear everything down, whatever happened. Exit status 0 only when every check passed.
Environment: IMAGE (cloudmatrix-infer:0.1.0), OVERLAY (k8s/overlays/dev), WORK (runs/k8s-podman),
KEEP=1 leaves the pods running (then `podman pod rm -f` them and `podman network rm cmx-<ns>`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kube_pods import PodPlan, pod_plans  # noqa: E402

from cloudmatrix.rpc.channel import health_check_sync  # noqa: E402

IMAGE = os.environ.get("IMAGE", "cloudmatrix-infer:0.1.0")
OVERLAY = ROOT / os.environ.get("OVERLAY", "k8s/overlays/dev")
WORK = ROOT / os.environ.get("WORK", "runs/k8s-podman")
MAX_TOKENS = 12
PROMPT = "Kubernetes pod 0 asks the supernode about"


class Failed(Exception):
    pass


@contextmanager
def step(name: str):
    start = time.monotonic()
    print(f"==> {name}", flush=True)
    try:
        yield
    finally:
        print(f"    {name}: {time.monotonic() - start:.1f} s", flush=True)


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    run = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        raise Failed(f"podman {' '.join(args)} exited {run.returncode}:\n{run.stderr.strip()}")
    return run


def render(overlay: Path) -> list[dict]:
    kubectl = Path(sysconfig.get_path("scripts")) / "kubectl"
    run = subprocess.run([str(kubectl), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise Failed(f"kubectl kustomize {overlay}:\n{run.stderr}")
    return [d for d in yaml.safe_load_all(run.stdout) if d]


def prepare(plan: PodPlan) -> Path:
    """The pod's volume directories and its manifest file."""
    uid, gid = plan.user
    for volume, files in plan.volumes.items():
        directory = WORK / plan.name / "volumes" / volume
        directory.mkdir(parents=True, exist_ok=True)
        for file, text in files.items():
            (directory / file).write_text(text)
            os.chmod(directory / file, 0o444)
        if files:  # a ConfigMap: read-only to the pod
            os.chown(directory, 0, gid)
            os.chmod(directory, 0o755)
        else:  # emptyDir or PVC: the pod's user writes, its fsGroup shares (setgid)
            os.chown(directory, uid, gid)
            os.chmod(directory, 0o2770)
    path = WORK / f"{plan.name}.yaml"
    path.write_text(yaml.safe_dump(plan.manifest, sort_keys=False))
    return path


def play(plan: PodPlan, network: str) -> None:
    spec = f"{network}:" + ",".join(f"alias={a}" for a in plan.aliases) if plan.aliases else network
    # One log file per pod, its init containers' included (podman removes an init container, and
    # its own log, when it exits): what a failed play shows.
    try:
        podman("kube", "play", "--network", spec, "--log-opt", f"path={WORK / plan.name}.log",
               str(WORK / f"{plan.name}.yaml"), timeout=900)
    except Failed as error:
        log = WORK / f"{plan.name}.log"
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else "(no log)"
        raise Failed(f"{error}\n--- {plan.name}'s containers' log, last lines:\n{tail}") from None


def pod_ip(pod: str, network: str) -> str:
    infra = json.loads(podman("pod", "inspect", pod).stdout)
    infra = infra[0] if isinstance(infra, list) else infra
    details = json.loads(podman("inspect", infra["InfraContainerID"]).stdout)[0]
    return details["NetworkSettings"]["Networks"][network]["IPAddress"]


def container(plan: PodPlan, name: str) -> str:
    return f"{plan.name}-{name}"  # podman kube play names a pod's containers <pod>-<container>


def state(name: str) -> dict:
    return json.loads(podman("inspect", name).stdout)[0]["State"]


def logs(name: str) -> str:
    run = podman("logs", "--tail", "40", name, check=False)  # the pod's log file: all its containers
    return (run.stdout + run.stderr)[-3000:]


def wait_ready(plans: list[PodPlan], ips: dict[str, str], timeout_s: float) -> None:
    waiting = [(p, c, port) for p in plans for c, port in p.probes.items()]
    deadline = time.monotonic() + timeout_s
    while waiting:
        for plan, name, _ in waiting:
            current = state(container(plan, name))
            if current["Status"] in ("exited", "stopped") or current.get("RestartCount", 0):
                raise Failed(f"{container(plan, name)} {current['Status']} (exit {current['ExitCode']}):\n"
                             f"{logs(container(plan, name))}")
        waiting = [(p, c, port) for p, c, port in waiting
                   if health_check_sync(f"{ips[p.name]}:{port}", timeout=1.0) != "SERVING"]
        if waiting and time.monotonic() > deadline:
            raise Failed(f"not ready after {timeout_s:.0f} s: {[container(p, c) for p, c, _ in waiting]}")
        time.sleep(1.0 if waiting else 0)


def check_security(plans: list[PodPlan]) -> None:
    """Every container: the pod's non-root user, a read-only root filesystem, no capabilities and
    no privilege escalation, as podman runs it and as the process inside sees it."""
    probe = ("import os, sys\n"
             "for path in ('/', '/opt/venv', '/etc'):\n"
             "    try:\n"
             "        open(os.path.join(path, '.cmx-write-test'), 'w')\n"
             "        sys.exit(f'{path} is writable')\n"
             "    except OSError as e:\n"
             "        assert e.errno == 30, (path, e)  # EROFS\n"
             "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
             "assert int(status['CapEff'], 16) == 0 and status['NoNewPrivs'].strip() == '1', status['CapEff']\n"
             "print(os.getuid(), os.getgid())")
    for plan in plans:
        uid, _ = plan.user
        for spec in plan.manifest["spec"]["containers"]:
            name = container(plan, spec["name"])
            config = json.loads(podman("inspect", name).stdout)[0]
            if not config["HostConfig"]["ReadonlyRootfs"]:
                raise Failed(f"{name}: root filesystem not read-only")
            seen = podman("exec", name, "python", "-c", probe, check=False)
            if seen.returncode != 0 or seen.stdout.split()[:1] != [str(uid)] or uid == 0:
                raise Failed(f"{name}: expected uid {uid} (non-root) on a read-only root: "
                             f"{seen.stdout.strip()} {seen.stderr.strip()[-500:]}")
        print(f"    {plan.name}: {len(plan.manifest['spec']['containers'])} containers, uid {uid}, "
              "root filesystem read-only, no capabilities, no_new_privs", flush=True)


def complete(gateway_ip: str, http_port: int) -> tuple[str, int]:
    client = openai.OpenAI(base_url=f"http://{gateway_ip}:{http_port}/v1", api_key="unused", max_retries=0,
                           timeout=120.0)
    model = client.models.list().data[0].id
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    text, tokens = "", 0
    for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    return text, tokens


def teardown(plans: list[PodPlan], network: str) -> None:
    with ThreadPoolExecutor(max(1, len(plans))) as pool:
        list(pool.map(lambda p: podman("pod", "rm", "--force", "--time", "10", p.name, check=False, timeout=120),
                      plans))
    podman("network", "rm", "--force", network, check=False)


def main() -> int:
    os.environ["CONTAINERS_CONF"] = subprocess.run(
        ["bash", str(ROOT / "scripts/image/podman-conf.sh")], capture_output=True, text=True, check=True,
        env={**os.environ, "WORK": str(ROOT / "runs/image")}).stdout.strip()
    if shutil.which("podman") is None:
        raise Failed("podman is not installed: `make image` installs it (as root) and builds the image")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        raise Failed(f"no image {IMAGE}: run `make image` first")
    with step(f"render {OVERLAY.relative_to(ROOT)}"):
        objects = render(OVERLAY)
        namespace = next((o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"), "default")
        network = namespace if namespace.startswith("cmx") else f"cmx-{namespace}"
        plans = pod_plans(objects, WORK)
        for plan in plans:
            if any(c["image"] != IMAGE for c in plan.manifest["spec"]["containers"]):
                raise Failed(f"{plan.name}: a container's image is not {IMAGE}")
        print(f"    pods: {', '.join(p.name for p in plans)}", flush=True)
    teardown(plans, network)  # what an interrupted run left
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    try:
        with step(f"podman network {network} and volumes"):
            podman("network", "create", network)
            for plan in plans:
                prepare(plan)
        with step("podman kube play (init containers run before each pod's containers start)"):
            with ThreadPoolExecutor(len(plans)) as pool:
                list(pool.map(lambda p: play(p, network), plans))
            ips = {p.name: pod_ip(p.name, network) for p in plans}
            for plan in plans:
                print(f"    {plan.name} {ips[plan.name]}: {', '.join(plan.aliases[:1] or ['-'])}", flush=True)
        with step("readiness (each container's gRPC readiness probe)"):
            wait_ready(plans, ips, timeout_s=300.0)
        with step("security (non-root user, read-only root filesystem)"):
            check_security(plans)
        with step("openai client -> gateway: a streamed completion"):
            gateway = next(p for p in plans if p.name.startswith("gateway-"))
            text, tokens = complete(ips[gateway.name], gateway.ports["http"])
            print(f"    {tokens} tokens: {text!r}", flush=True)
            if not text or tokens != MAX_TOKENS:
                raise Failed(f"expected {MAX_TOKENS} completion tokens of text, got {tokens}: {text!r}")
    except Failed:
        print(podman("ps", "--all", "--format", "{{.Names}}\t{{.Status}}", check=False).stdout, file=sys.stderr)
        raise
    finally:
        if not os.environ.get("KEEP"):
            with step("teardown"):
                teardown(plans, network)
    print("test-k8s-podman: passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as error:
        print(f"test-k8s-podman: FAILED: {error}", file=sys.stderr)
        sys.exit(1)
