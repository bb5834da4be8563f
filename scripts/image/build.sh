#!/usr/bin/env bash
# `make image`: the Dockerfile's image, built with podman from Debian's packages alone (docs/kubernetes-image.md).
#   1. tools: podman, mmdebstrap (or debootstrap) and what rootful podman needs; installed with
#      apt-get when missing and this runs as root, otherwise named and the script stops;
#   2. base: a minimal Debian bookworm root filesystem with python3 (3.11, venv) made by mmdebstrap
#      from deb.debian.org, imported as $BASE_IMAGE: no image registry is contacted;
#   3. torch: unless TORCH_INDEX_URL is given, a local package index with torch's CPU wheel and its
#      dependencies (pip download with this machine's pip settings), mounted into the build stage;
#   4. the image: `podman build` of the Dockerfile, unchanged but for its BASE build argument.
# Each step prints its wall time. Environment: IMAGE, BASE_IMAGE, SUITE, MIRROR, SECURITY_MIRROR,
# TORCH_INDEX_URL, WORK (cache folder, default runs/image), REBUILD_BASE=1 to remake the base.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-cloudmatrix-infer:0.1.0}
BASE_IMAGE=${BASE_IMAGE:-localhost/cmx-debian-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
WORK=${WORK:-runs/image}
PYTHON=${PYTHON:-python3}
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

step_start=0
step() { step_start=$(date +%s%N); echo "==> $*"; }
done_step() { local ms=$((($(date +%s%N) - step_start) / 1000000)); printf '    %s: %d.%d s\n' "$1" $((ms / 1000)) $((ms % 1000 / 100)); }
fail() { echo "make image: $*" >&2; exit 1; }

# -- 1. tools -----------------------------------------------------------------------------------
step "tools"
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v mmdebstrap >/dev/null || command -v debootstrap >/dev/null || missing+=(mmdebstrap)
for pkg in crun runc fuse-overlayfs uidmap slirp4netns catatonit; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || fail "missing ${missing[*]}: run as root or apt-get install -y ${missing[*]}"
    echo "    apt-get install -y ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
CONTAINERS_CONF=$(WORK="$WORK" bash scripts/image/podman-conf.sh)
export CONTAINERS_CONF
echo "    CONTAINERS_CONF=$CONTAINERS_CONF ($(sed -n 's/^runtime = //p' "$CONTAINERS_CONF"))"
podman info >/dev/null 2>"$WORK/podman-info.err" || fail "podman info failed: $(cat "$WORK/podman-info.err")"
done_step tools

# -- 2. the Debian base image -------------------------------------------------------------------
step "base $BASE_IMAGE (Debian $SUITE, minbase + $BASE_PACKAGES)"
if [ -n "${REBUILD_BASE:-}" ] || ! podman image exists "$BASE_IMAGE"; then
    rm -f "$WORK/base.tar"
    if command -v mmdebstrap >/dev/null; then
        nice mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" \
            --aptopt='Acquire::Languages "none"' \
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            "$SUITE" "$WORK/base.tar" \
            "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
            "deb $SECURITY_MIRROR $SUITE-security main"
    else
        rootfs="$WORK/rootfs"
        rm -rf "$rootfs"
        nice debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR"
        chroot "$rootfs" apt-get clean
        rm -rf "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" --numeric-owner -cf "$WORK/base.tar" .
        rm -rf "$rootfs"
    fi
    podman import --quiet --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$WORK/base.tar" "$BASE_IMAGE" >/dev/null
    rm -f "$WORK/base.tar"
else
    echo "    exists (REBUILD_BASE=1 remakes it)"
fi
podman run --rm --network none "$BASE_IMAGE" python --version
done_step base

# -- 3. torch's CPU build ------------------------------------------------------------------------
build_args=(--build-arg "BASE=$BASE_IMAGE")
volumes=()
step "torch 2.13.0 CPU"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "    from TORCH_INDEX_URL=$TORCH_INDEX_URL"
    build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
else
    # The Dockerfile installs torch with `--index-url $TORCH_INDEX_URL` (the CPU index): a local
    # index of the same packages stands in for it, from the CPU wheel pip finds here (its
    # find-links) or on the CPU index, and torch's dependencies from PyPI.
    wheels="$WORK/wheels"
    rm -rf "$wheels" && mkdir -p "$wheels/files"
    if ! nice "$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.11 \
            --platform manylinux_2_28_x86_64 -d "$wheels/files" 'torch==2.13.0+cpu' 2>"$WORK/pip.err"; then
        nice "$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.11 \
            --platform manylinux_2_28_x86_64 -d "$wheels/files" \
            --extra-index-url https://download.pytorch.org/whl/cpu 'torch==2.13.0+cpu' \
            || fail "no torch 2.13.0+cpu wheel: $(cat "$WORK/pip.err")"
    fi
    "$PYTHON" scripts/image/simple_index.py "$wheels"
    ls "$wheels/files" | sed 's/^/    /'
    build_args+=(--build-arg "TORCH_INDEX_URL=file:///cmx-wheels/simple")
    volumes+=(--volume "$wheels:/cmx-wheels:ro")
fi
# pip in the build stage trusts this machine's CA bundle (where a TLS proxy stands between this
# machine and PyPI, its CA is there): a pip.conf naming it, mounted for the build's RUN steps only.
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$ca" ]; then
    printf '[global]\ncert = /cmx-host-ca.crt\n' >"$WORK/pip.conf"
    volumes+=(--volume "$ca:/cmx-host-ca.crt:ro" --volume "$WORK/pip.conf:/etc/pip.conf:ro")
fi
done_step torch

# -- 4. the image ---------------------------------------------------------------------------------
step "podman build -t $IMAGE (FROM $BASE_IMAGE)"
# --network host: the build stage's pip reaches PyPI as this machine does (no bridge needed).
echo "    log: $WORK/build.log"
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
if ! nice podman build --network host --pull=never --layers=false "${build_args[@]}" "${volumes[@]}" \
        -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1; then
    tail -n 30 "$WORK/build.log" >&2
    fail "podman build failed; the log: $WORK/build.log"
fi
grep -E '^(\[[0-9]/[0-9]\] )?(STEP|COMMIT)' "$WORK/build.log" | sed 's/^/    /' || true
if [ -z "${TORCH_INDEX_URL:-}" ]; then rm -rf "$WORK/wheels"; fi
podman image exists "$IMAGE" || fail "podman build left no $IMAGE; the log: $WORK/build.log"
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true  # the image this build replaced, now untagged
fi
podman run --rm --network none --read-only "$IMAGE" python -c \
    'import os, torch, services.gateway; print("user", os.getuid(), "torch", torch.__version__)'
podman image ls --format '    {{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "cloudmatrix-infer|cmx-debian-base"
done_step image
