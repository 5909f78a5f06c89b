#!/usr/bin/env bash
# Make a Docker Engine available for the DockerBackend tests, idempotently:
#   1. install docker.io (Debian) when dockerd is missing;
#   2. start dockerd (data root under /tmp, no systemd needed) unless one already answers;
#   3. create the registry-free test image local/empty:1 (an empty filesystem: the tests
#      bind-mount the host's /usr, /lib, /etc... and Python read-only) when it is missing.
# Exits non-zero, with the reason on stderr, when any step fails: 3 when the engine itself
# cannot be installed or started (the tests then skip, saying why), 1 otherwise.
set -euo pipefail

STATE_DIR="${FLAME_DOCKER_STATE:-/tmp/flame-dockerd}"
IMAGE="${FLAME_DOCKER_TEST_IMAGE:-local/empty:1}"
SOCK="/var/run/docker.sock"
export DOCKER_HOST="${DOCKER_HOST:-unix://$SOCK}"

say() { echo "docker.sh: $*" >&2; }

if ! command -v dockerd >/dev/null 2>&1; then
    say "installing docker.io"
    if [ "$(id -u)" != 0 ]; then say "dockerd is missing and we are not root"; exit 3; fi
    export DEBIAN_FRONTEND=noninteractive
    lock=(); command -v flock >/dev/null 2>&1 && lock=(flock /tmp/apt.lock)
    "${lock[@]}" apt-get update -q >/dev/null || { say "apt-get update failed"; exit 3; }
    "${lock[@]}" apt-get install -y -q --no-install-recommends docker.io >/dev/null \
        || { say "apt-get install docker.io failed"; exit 3; }
fi

mkdir -p "$STATE_DIR"
exec 9>"$STATE_DIR.lock"
flock 9  # one starter at a time: concurrent runs wait for the first one's engine

if ! docker info >/dev/null 2>&1; then
    if [ -f "$STATE_DIR/dockerd.pid" ] && kill -0 "$(cat "$STATE_DIR/dockerd.pid")" 2>/dev/null; then
        say "dockerd (pid $(cat "$STATE_DIR/dockerd.pid")) is starting; waiting for it"
    else
        say "starting dockerd (data root $STATE_DIR/data, log $STATE_DIR/dockerd.log)"
        # setsid + nohup: the engine outlives this script and the test run that started it.
        setsid nohup dockerd --data-root "$STATE_DIR/data" --exec-root "$STATE_DIR/exec" \
            --pidfile "$STATE_DIR/dockerd.pid" --host "unix://$SOCK" \
            >"$STATE_DIR/dockerd.log" 2>&1 </dev/null 9>&- &
    fi
    for _ in $(seq 1 150); do
        docker info >/dev/null 2>&1 && break
        sleep 0.2
    done
    if ! docker info >/dev/null 2>&1; then
        say "dockerd did not come up within 30 s; last lines of its log:"
        tail -n 20 "$STATE_DIR/dockerd.log" >&2 || true
        exit 3
    fi
fi

if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
    say "creating the empty image $IMAGE"
    tmp="$(mktemp -d)"
    tar -cf "$tmp/empty.tar" --files-from /dev/null
    docker import "$tmp/empty.tar" "$IMAGE" >/dev/null
    rm -rf "$tmp"
fi
say "ready: $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"
