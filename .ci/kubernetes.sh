#!/usr/bin/env bash
# Build a real single-node Kubernetes for the KubernetesBackend tests, idempotently:
#   1. install the build tools, etcd and the container runtime's pieces from Debian
#      (golang-go dpkg-dev rsync jq etcd-server etcd-client, plus conntrack iptables socat
#      that the kubelet expects on a node) when they are missing;
#   2. fetch Debian's source package of Kubernetes 1.20.2 (vendored Go dependencies, so no
#      Go proxy is needed) through a deb-src line for the machine's configured mirror, with
#      a private apt state dir so the system's apt lists are left alone;
#   3. unpack it into a GOPATH tree and build kube-apiserver, kube-controller-manager,
#      kube-scheduler and kubelet in one `make` (one Go build cache shared by the four:
#      ~12 min on 2 cores), plus the pause image's binary (build/pause/linux/pause.c, static);
#   4. cache the binaries under ~/.cache/flame-asgi/kubernetes-1.20.2/ (outside the repo).
# Cached binaries make the script return at once. Prints the cache directory on stdout.
# Exits non-zero, with the reason on stderr, when any step fails: 3 when the tools or the
# source cannot be obtained (the tests then skip, saying why), 1 otherwise.
set -euo pipefail

VERSION="1.20.2"
CACHE="${FLAME_K8S_CACHE:-$HOME/.cache/flame-asgi/kubernetes-$VERSION}"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
PACKAGES=(golang-go gcc libc6-dev dpkg-dev rsync jq etcd-server etcd-client conntrack iptables socat ethtool)

say() { echo "kubernetes.sh: $*" >&2; }
apt_locked() { if command -v flock >/dev/null 2>&1; then flock /tmp/apt.lock "$@"; else "$@"; fi; }

need_tools() {
    for tool in go gcc dpkg-source rsync jq etcd etcdctl conntrack iptables socat ethtool; do
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

# The kubelet is built with one change (see "patch" below); the stamp names that change, so
# a kubelet cached before it (or before a later one) is built again.
KUBELET_PATCH=oom-floor-0
missing() {  # the binaries to build: absent ones, and a kubelet without the current patch
    for b in "${BINARIES[@]}"; do
        if [ ! -x "$CACHE/$b" ] || { [ "$b" = kubelet ] && [ ! -e "$CACHE/kubelet.$KUBELET_PATCH" ]; }; then
            echo "$b"
        fi
    done
}
cached() {
    [ -z "$(missing)" ] && [ -x "$CACHE/pause" ] && "$CACHE/kube-apiserver" --version >/dev/null 2>&1
}
if cached; then
    echo "$CACHE"
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE.lock"
flock 9  # one builder at a time: a concurrent run waits, then finds the cached binaries
if cached; then
    echo "$CACHE"
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

# The patch: a kubelet gives Pod sandboxes an OOM score adjustment of -998 and Guaranteed
# containers -997, and writing a negative one needs CAP_SYS_RESOURCE, which these machines
# (themselves containers) do not have: runc then fails every sandbox ("can't get final
# child's PID from pipe"). Here both get 0, the lowest this machine allows; Burstable and
# BestEffort Pods keep their scores (3..1000). Nothing else in the tree changes.
KTREE="$GOPATH/src/k8s.io/kubernetes"
sed -i 's/^\(\s*defaultSandboxOOMAdj int = \)-998$/\10/' "$KTREE/pkg/kubelet/dockershim/docker_sandbox.go"
sed -i 's/^\(\s*\)return guaranteedOOMScoreAdj$/\1return 0/' "$KTREE/pkg/kubelet/qos/policy.go"
grep -q 'defaultSandboxOOMAdj int = 0$' "$KTREE/pkg/kubelet/dockershim/docker_sandbox.go" \
    && [ "$(grep -c 'return 0$' "$KTREE/pkg/kubelet/qos/policy.go")" -ge 2 ] \
    || { say "the kubelet patch no longer applies to this source tree"; exit 1; }

targets=""
for b in $(missing); do targets="$targets cmd/$b"; done
say "building${targets} with $(go version | awk '{print $3}') (several minutes)"
start=$(date +%s)
(
    cd "$GOPATH/src/k8s.io/kubernetes"
    # No .git in a source package: name the version so `--version` says what it is.
    # CGO_ENABLED=0 for all four: static binaries, and the kubelet needs no cgo on Linux.
    export GOPATH CGO_ENABLED=0 GOPROXY=off KUBE_GIT_VERSION="v$VERSION" KUBE_GIT_TREE_STATE=clean
    export GOCACHE="$WORK/gocache"
    make WHAT="${targets# }" >"$WORK/make.log" 2>&1
) || { say "make WHAT=${targets# } failed; last lines of $WORK/make.log:"; tail -n 30 "$WORK/make.log" >&2; exit 1; }

for b in $(missing); do
    built="$(find "$GOPATH/src/k8s.io/kubernetes/_output" -type f -name "$b" -perm -u+x | head -n 1)"
    [ -n "$built" ] || { say "make succeeded but no $b binary was produced"; exit 1; }
    cp "$built" "$CACHE/$b.tmp"
    mv "$CACHE/$b.tmp" "$CACHE/$b"  # atomic: a concurrent reader never sees half a binary
    [ "$b" = kubelet ] && touch "$CACHE/kubelet.$KUBELET_PATCH"
done
# The Pod sandbox ("pause") container: Kubernetes' own tiny C program, built static so it
# runs in a FROM-scratch image (nothing may be pulled, the pause image included).
[ -x "$CACHE/pause" ] || gcc -Os -static -DVERSION="v$VERSION-flame" -o "$CACHE/pause.tmp" \
    "$GOPATH/src/k8s.io/kubernetes/build/pause/linux/pause.c" \
    || { say "building the pause binary failed"; exit 1; }
[ -e "$CACHE/pause.tmp" ] && mv "$CACHE/pause.tmp" "$CACHE/pause"
say "built $("$CACHE/kube-apiserver" --version) and the rest in $(( $(date +%s) - start )) s"
rm -rf "$WORK"
echo "$CACHE"
