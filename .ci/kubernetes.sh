#!/usr/bin/env bash
# Build a real kube-apiserver for the KubernetesBackend tests, idempotently:
#   1. install the build tools and etcd from Debian (golang-go dpkg-dev rsync jq
#      etcd-server etcd-client) when they are missing;
#   2. fetch Debian's source package of Kubernetes 1.20.2 (vendored Go dependencies, so no
#      Go proxy is needed) through a deb-src line for the machine's configured mirror, with
#      a private apt state dir so the system's apt lists are left alone;
#   3. unpack it into a GOPATH tree and `make WHAT=cmd/kube-apiserver` (5–8 min on 2 cores);
#   4. cache the binary under ~/.cache/flame-asgi/kube-apiserver-1.20.2/ (outside the repo).
# A cached binary makes the script return at once. Prints the binary's path on stdout.
# Exits non-zero, with the reason on stderr, when any step fails: 3 when the tools or the
# source cannot be obtained (the tests then skip, saying why), 1 otherwise.
set -euo pipefail

VERSION="1.20.2"
CACHE="${FLAME_K8S_CACHE:-$HOME/.cache/flame-asgi/kube-apiserver-$VERSION}"
BIN="$CACHE/kube-apiserver"
PACKAGES=(golang-go dpkg-dev rsync jq etcd-server etcd-client)

say() { echo "kubernetes.sh: $*" >&2; }
apt_locked() { if command -v flock >/dev/null 2>&1; then flock /tmp/apt.lock "$@"; else "$@"; fi; }

need_tools() {
    for tool in go dpkg-source rsync jq etcd etcdctl; do
        command -v "$tool" >/dev/null 2>&1 || return 0
    done
    return 1
}

if need_tools; then
    if [ "$(id -u)" != 0 ]; then say "build tools are missing and we are not root"; exit 3; fi
    say "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_locked apt-get update -q >/dev/null || { say "apt-get update failed"; exit 3; }
    apt_locked apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null \
        || { say "apt-get install ${PACKAGES[*]} failed"; exit 3; }
fi

if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE.lock"
flock 9  # one builder at a time: a concurrent run waits, then finds the cached binary
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
    echo "$BIN"
    exit 0
fi

WORK="$CACHE/build"
rm -rf "$WORK"
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/apt/sources.list.d" "$WORK/src"

# The mirror the machine is configured with (deb822 format), else the Debian default.
MIRROR=""
if [ -r /etc/apt/sources.list.d/debian.sources ]; then
    MIRROR="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
        /etc/apt/sources.list.d/debian.sources)"
fi
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm  # the release whose kubernetes source package is 1.20.2, whatever this machine runs
say "fetching the kubernetes source package from $MIRROR ($SUITE)"

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
if [ -r "$KEYRING" ]; then
    echo "deb-src [signed-by=$KEYRING] $MIRROR $SUITE main" >"$WORK/apt/sources.list"
else
    echo "deb-src $MIRROR $SUITE main" >"$WORK/apt/sources.list"
fi
APT_OPTS=(
    -o "Dir::Etc::SourceList=$WORK/apt/sources.list"
    -o "Dir::Etc::SourceParts=$WORK/apt/sources.list.d"
    -o "Dir::State=$WORK/apt"
    -o "Dir::State::Lists=$WORK/apt/lists"
    -o "Dir::Cache=$WORK/apt/cache"
    -o "APT::Sandbox::User=root"
)
# The private state dir shares nothing with the system's apt, but the download still
# goes through the mirror other workers use: take the same lock for politeness.
apt_locked apt-get "${APT_OPTS[@]}" update -q >/dev/null \
    || { say "apt-get update (deb-src $MIRROR) failed"; exit 3; }
(cd "$WORK/src" && apt_locked apt-get "${APT_OPTS[@]}" source --download-only -q kubernetes >/dev/null) \
    || { say "apt-get source --download-only kubernetes failed"; exit 3; }

dsc="$(ls "$WORK/src"/kubernetes_*.dsc | head -n 1)"
say "unpacking $(basename "$dsc")"
(cd "$WORK/src" && dpkg-source -x --no-check "$dsc" tree >/dev/null) \
    || { say "dpkg-source -x failed"; exit 1; }

GOPATH="$WORK/gopath"
mkdir -p "$GOPATH/src/k8s.io"
mv "$WORK/src/tree" "$GOPATH/src/k8s.io/kubernetes"

say "building cmd/kube-apiserver with $(go version | awk '{print $3}') (several minutes)"
start=$(date +%s)
(
    cd "$GOPATH/src/k8s.io/kubernetes"
    # No .git in a source package: name the version so `--version` says what it is.
    export GOPATH CGO_ENABLED=0 GOPROXY=off KUBE_GIT_VERSION="v$VERSION" KUBE_GIT_TREE_STATE=clean
    export GOCACHE="$WORK/gocache"
    make WHAT=cmd/kube-apiserver >"$WORK/make.log" 2>&1
) || { say "make WHAT=cmd/kube-apiserver failed; last lines of $WORK/make.log:"; tail -n 30 "$WORK/make.log" >&2; exit 1; }

built="$(find "$GOPATH/src/k8s.io/kubernetes/_output" -type f -name kube-apiserver -perm -u+x | head -n 1)"
[ -n "$built" ] || { say "make succeeded but no kube-apiserver binary was produced"; exit 1; }
cp "$built" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"  # atomic: a concurrent reader never sees half a binary
say "built $("$BIN" --version) in $(( $(date +%s) - start )) s"
rm -rf "$WORK"
echo "$BIN"
