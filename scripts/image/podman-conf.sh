#!/usr/bin/env bash
# Print the path of a containers.conf that lets rootful podman run containers on this machine, and
# write it when missing (WORK, default runs/image). Used as CONTAINERS_CONF by scripts/image/*.
# What it works around, where the machine needs it (docs/kubernetes-image.md):
#   - no CAP_SYS_RESOURCE: podman's default rlimits (nofile 1048576, nproc up to 4194304) are above
#     this process's hard limits, and crun/runc fail with "setrlimit `RLIMIT_NOFILE`: Operation not
#     permitted"; the containers get this machine's hard limits instead (nproc at most 32768, the
#     most podman gives conmon);
#   - cgroup v1 with a cgroup v2 hierarchy that still has a controller (hybrid mode): crun 1.8 refuses
#     it ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2"), runc runs it.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-runs/image}
mkdir -p "$WORK"
conf="$(cd "$WORK" && pwd)/containers.conf"

nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
nproc=$(ulimit -Hu); { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
runtime=crun
if grep -qs . /sys/fs/cgroup/unified/cgroup.controllers; then
    runtime=runc  # hybrid cgroups with a v2 controller: crun refuses them
fi
command -v "$runtime" >/dev/null || runtime=$(command -v crun >/dev/null && echo crun || echo runc)

cat >"$conf.new" <<EOF
# Written by scripts/image/podman-conf.sh for this machine; remade on every run.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "$runtime"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
mv "$conf.new" "$conf"
echo "$conf"
