#!/usr/bin/env bash
# The images the real cluster's Pods run, built on this machine and never pulled:
#   1. local/pause:3.2, the Pod sandbox: Kubernetes' own pause.c, built static by
#      .ci/kubernetes.sh, in a FROM-scratch image (the kubelet's --pod-infra-container-image);
#   2. local/host-mounts:1, for the tests' Pods that run this machine's Python and checkout
#      through read-only hostPath mounts: an image with one small file and nothing else (a
#      kubelet refuses an image of size 0, as `docker import` of an empty tar makes);
#   3. local/python:3.11-slim, a stand-in for Docker Hub's python:3.11-slim (which cannot be
#      pulled here): Debian bookworm made with debootstrap (minbase, python3, pip, venv), with
#      `python` and `pip` on PATH and system-wide pip installs allowed, as in the real one;
#      cached in the engine (~1 min to make, once per machine);
#   4. registry.example.com/flame-thumbs:1.0, the name docs/deploy/kubernetes.md deploys:
#      the repository's own Dockerfile, built FROM that base (its apt-get and pip steps run
#      against Debian's and PyPI's registries; Docker's layer cache keeps them until
#      pyproject.toml or flame_asgi/ change). Never pushed: the kubelet finds it locally
#      (a tag other than :latest is pulled only when absent).
# Usage: kubernetes-images.sh K8S_CACHE_DIR (the directory .ci/kubernetes.sh printed).
# Needs the engine of .ci/docker.sh. Exits non-zero, with the reason on stderr, on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${1:?usage: kubernetes-images.sh K8S_CACHE_DIR}"
PAUSE=local/pause:3.2
HOST_MOUNTS=local/host-mounts:1
BASE=local/python:3.11-slim
APP="${FLAME_K8S_APP_IMAGE:-registry.example.com/flame-thumbs:1.0}"
say() { echo "kubernetes-images.sh: $*" >&2; }
exec 9>/tmp/flame-k8s-images.lock
flock 9  # one builder at a time

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    if ! command -v debootstrap >/dev/null 2>&1; then
        say "installing debootstrap"
        export DEBIAN_FRONTEND=noninteractive
        flock /tmp/apt.lock apt-get update -q >/dev/null
        flock /tmp/apt.lock apt-get install -y -q --no-install-recommends debootstrap >/dev/null
    fi
    MIRROR="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
        /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
    root="$(mktemp -d)/rootfs"
    say "making $BASE with debootstrap from $MIRROR (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
        bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
        || { say "debootstrap failed; last lines:"; tail -n 20 "$root.log" >&2; exit 1; }
    # The machine's CA bundle: pip in the build reaches PyPI through the same trust as the host.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED  # python:3.11-slim lets pip install system-wide
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        --change 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$(dirname "$root")"
fi

if ! docker image inspect "$PAUSE" >/dev/null 2>&1; then
    say "building $PAUSE"
    ctx="$(mktemp -d)"
    cp "$CACHE/pause" "$ctx/pause"
    printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' >"$ctx/Dockerfile"
    docker build -q -t "$PAUSE" "$ctx" >/dev/null
    rm -rf "$ctx"
fi

if ! docker image inspect "$HOST_MOUNTS" >/dev/null 2>&1; then
    say "building $HOST_MOUNTS"
    ctx="$(mktemp -d)"
    echo "This image runs the host's own system, mounted read-only (tests/backends/kubernetes)." >"$ctx/README"
    printf 'FROM scratch\nCOPY README /README\n' >"$ctx/Dockerfile"
    docker build -q -t "$HOST_MOUNTS" "$ctx" >/dev/null
    rm -rf "$ctx"
fi

say "building $APP from ./Dockerfile (FROM $BASE)"
docker build -q --build-arg "PYTHON_IMAGE=$BASE" -t "$APP" . >/dev/null \
    || { say "docker build of ./Dockerfile failed"; exit 1; }
echo "$APP"
