"""A real single-node Kubernetes 1.20 on this machine, for the KubernetesBackend tests.

etcd, kube-apiserver, kube-controller-manager (its garbage collector deletes what a gone
owner owned), kube-scheduler and a kubelet that runs Pods as Docker containers through its
built-in dockershim, on the engine of ``.ci/docker.sh``. The binaries come from
``.ci/kubernetes.sh`` (Debian's source package, built once and cached under ``~/.cache``),
the images from ``.ci/kubernetes-images.sh`` (built here, never pulled; the pause image
too).

Why the Docker engine and not Debian's containerd: kubelet 1.20 speaks to Docker itself,
the engine is already here for the DockerBackend tests, and images built with
``docker build`` are then the node's images with no import step.

The network rule of this machine (no traffic to private-range addresses outside a
namespace a test made) is kept by running every Pod on the node's network: the node's
address is 127.0.0.1, so a Pod IP is 127.0.0.1 and runner Pods listen on a port each
(``KubernetesBackend(host_network=True)``). With no Pod network there is no kube-proxy
either: Pods reach the API server on 127.0.0.1 directly (``KUBERNETES_SERVICE_HOST``).
Everything listens on 127.0.0.1 high ports; the kubelet's state lives under a temporary
directory and its mounts are undone at the end, as are its containers.

Where this machine differs from a cloud node, and what stands in:
- a kubelet refuses a loopback node address, so it runs with an external cloud provider
  and ``_initialize_node`` does what that provider's node controller does (set the node's
  addresses, lift the "uninitialized" taint);
- this machine is itself a container without CAP_SYS_RESOURCE, so no process may get a
  negative OOM score: the kubelet is built with a floor of 0 for sandboxes and Guaranteed
  Pods (``.ci/kubernetes.sh`` says how), runs with ``--oom-score-adj=0``, and has no QoS
  cgroup tree (``--cgroups-per-qos=false``); Docker's per-container cgroups still enforce
  each container's limits, so an OOM kill is the kernel's, reported by the kubelet.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx

REPO = Path(__file__).resolve().parents[3]
NODE = "flame-node"
UNINITIALIZED = "node.cloudprovider.kubernetes.io/uninitialized"  # an external cloud provider's taint
PAUSE_IMAGE = "local/pause:3.2"
LOCK = "/tmp/flame-k8s-cluster.lock"
BUILD_UNAVAILABLE = 3  # .ci/kubernetes.sh's exit code when the tools or the source cannot be had


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be had on this machine (the reason says which part, and why)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str, token: str | None = None, verify: ssl.SSLContext | bool = False) -> bool:
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(url, headers=headers, verify=verify, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def run_script(name: str, *args: str, timeout: float = 3000) -> str:
    """Run ``.ci/<name>`` and return the last line it printed (a path or an image name; "" for none)."""
    try:
        done = subprocess.run(["bash", str(REPO / ".ci" / name), *args], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterUnavailable(f".ci/{name} did not finish: {exc}") from None
    if done.returncode == BUILD_UNAVAILABLE:
        raise ClusterUnavailable(f".ci/{name}: {done.stderr.strip()[-600:]}")
    if done.returncode != 0:
        raise RuntimeError(f".ci/{name} failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()  # docker.sh prints nothing on stdout: its news go to stderr
    return lines[-1] if lines else ""


class Cluster:
    """Start with :meth:`start`, end with :meth:`stop` (every process, container and mount)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.admin_token = secrets.token_hex(16)
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.kubelet_dir = tmp / "kubelet"
        self.app_image = ""
        self._lock: IO[str] | None = None
        self._clean_since: float | None = None

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        # One cluster per machine at a time: a kubelet stops every Pod container on its engine
        # that its own API server does not know, so two would kill each other's Pods. A second
        # test run waits here for the first to finish.
        self._lock = open(LOCK, "w")  # held until stop()
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        binaries = Path(run_script("kubernetes.sh"))
        if shutil.which("etcd") is None:
            raise ClusterUnavailable("etcd is not installed (.ci/kubernetes.sh installs etcd-server)")
        if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
            run_script("docker.sh")
        self.app_image = run_script("kubernetes-images.sh", str(binaries))
        self._remove_pod_containers()  # what a run that was killed outright left
        self._credentials()
        self._etcd()
        self._apiserver(binaries / "kube-apiserver")
        config = self.write_kubeconfig("admin", self.admin_token)
        self._spawn("controller-manager", [
            binaries / "kube-controller-manager", f"--kubeconfig={config}", "--leader-elect=false",
            "--port=0", "--secure-port=0", f"--service-account-private-key-file={self.tmp / 'sa.key'}",
            f"--root-ca-file={self.tmp / 'ca.crt'}", "--use-service-account-credentials=false",
            # No Pod network: nothing to allocate, no cloud, and nodes are never evicted for
            # being slow to report while the machine is busy.
            "--allocate-node-cidrs=false", "--controllers=*,-nodeipam,-cloud-node-lifecycle",
            "--node-monitor-grace-period=5m", "--pod-eviction-timeout=5m",
            "--concurrent-gc-syncs=5", "--v=1"])
        self._spawn("scheduler", [binaries / "kube-scheduler", f"--kubeconfig={config}", "--leader-elect=false",
                                  "--port=0", "--secure-port=0", "--v=1"])
        self._kubelet(binaries / "kubelet", config)
        self._wait(lambda: self._get(f"/api/v1/nodes/{NODE}") is not None, "the node to register", "kubelet",
                   within=120)
        self._initialize_node()
        self._wait(self._node_ready, "the node to be Ready", "kubelet", within=120)
        self._wait(self._node_schedulable, "the node to take Pods (no NoSchedule taint, for 3 s)", "controller-manager",
                   within=60)
        self._wait(lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default") is not None,
                   "the default service account", "controller-manager", within=60)

    def _credentials(self) -> None:
        def openssl(*args: str | Path) -> None:
            subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

        t = self.tmp
        (t / "tokens.csv").write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        openssl("genrsa", "-out", t / "sa.key", "2048")
        openssl("rsa", "-in", t / "sa.key", "-pubout", "-out", t / "sa.pub")
        # A CA, and the API server's certificate for 127.0.0.1 signed by it: Pods verify the
        # server with the CA their service account token comes with (ca.crt), as in a cluster.
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", t / "ca.key", "-out", t / "ca.crt",
                "-days", "2", "-subj", "/CN=flame-test-ca")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", t / "apiserver.key", "-out", t / "apiserver.csr",
                "-subj", "/CN=kube-apiserver")
        (t / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n")
        openssl("x509", "-req", "-in", t / "apiserver.csr", "-CA", t / "ca.crt", "-CAkey", t / "ca.key",
                "-CAcreateserial", "-out", t / "apiserver.crt", "-days", "2", "-extfile", t / "san.ext")

    def _etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn("etcd", [
            "etcd", "--name", "flame", "--data-dir", self.tmp / "etcd", "--listen-client-urls", self.etcd_url,
            "--advertise-client-urls", self.etcd_url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"flame=http://127.0.0.1:{peer}", "--unsafe-no-fsync"])
        self._wait(lambda: answers(f"{self.etcd_url}/health"), "etcd", "etcd")

    def _apiserver(self, binary: Path) -> None:
        t = self.tmp
        self._spawn("apiserver", [
            binary, f"--etcd-servers={self.etcd_url}", f"--secure-port={self.api_port}", "--insecure-port=0",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--tls-cert-file={t / 'apiserver.crt'}", f"--tls-private-key-file={t / 'apiserver.key'}",
            f"--client-ca-file={t / 'ca.crt'}", f"--token-auth-file={t / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={t / 'sa.pub'}", f"--service-account-signing-key-file={t / 'sa.key'}",
            # The Service range is never routed (no kube-proxy): no Pod sends anything there.
            "--service-cluster-ip-range=10.0.0.0/24", "--kubelet-preferred-address-types=InternalIP",
            "--v=1"])
        self._wait(lambda: answers(f"{self.server}/readyz", self.admin_token), "kube-apiserver", "apiserver")

    def _kubelet(self, binary: Path, config: Path) -> None:
        root = self.kubelet_dir
        root.mkdir()
        # cgroup v1 here, and the engine's driver is cgroupfs: the kubelet must match it.
        driver = subprocess.run(["docker", "info", "--format", "{{.CgroupDriver}}"], capture_output=True,
                                text=True, check=True).stdout.strip() or "cgroupfs"
        (root / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # no cluster DNS; nothing resolves names
        self._spawn("kubelet", [
            # The node's address is 127.0.0.1, which a kubelet refuses to take for itself
            # ("nodeIP can't be loopback address"); with an external cloud provider it leaves
            # the node's addresses to the provider's controller: _initialize_node plays it.
            binary, f"--kubeconfig={config}", f"--hostname-override={NODE}", "--cloud-provider=external",
            "--container-runtime=docker", "--docker-endpoint=unix:///var/run/docker.sock",
            f"--container-runtime-endpoint=unix://{root / 'dockershim.sock'}",
            f"--image-service-endpoint=unix://{root / 'dockershim.sock'}",
            f"--experimental-dockershim-root-directory={root / 'dockershim'}",
            f"--pod-infra-container-image={PAUSE_IMAGE}", f"--cgroup-driver={driver}",
            # The machine is itself a container: no QoS cgroup tree, no node allocatable
            # enforcement, no swap check, and the kubelet leaves the host's iptables alone.
            "--cgroups-per-qos=false", "--enforce-node-allocatable=", "--fail-swap-on=false",
            "--make-iptables-util-chains=false", "--hairpin-mode=none",
            f"--root-dir={root}", f"--cert-dir={root / 'pki'}", f"--resolv-conf={root / 'resolv.conf'}",
            f"--port={free_port()}", "--read-only-port=0", f"--healthz-port={free_port()}",
            "--healthz-bind-address=127.0.0.1", "--address=127.0.0.1",
            "--anonymous-auth=false", f"--client-ca-file={self.tmp / 'ca.crt'}",
            "--eviction-hard=memory.available<100Mi,nodefs.available<1%,imagefs.available<1%",
            "--image-gc-high-threshold=100", "--image-gc-low-threshold=99",
            "--serialize-image-pulls=false", "--node-status-update-frequency=2s", "--oom-score-adj=0", "--v=1"])

    def _initialize_node(self) -> None:
        """What a cloud provider's node controller does for a new node: set its addresses
        (here 127.0.0.1: a host-network Pod's IP is its node's), then lift the taint that
        keeps Pods off a node not initialized yet."""
        headers = {"Authorization": f"Bearer {self.admin_token}", "Content-Type": "application/merge-patch+json"}
        addresses = {"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                              {"type": "Hostname", "address": NODE}]}}
        with httpx.Client(base_url=self.server, headers=headers, verify=self.ssl(), timeout=10) as api:
            api.patch(f"/api/v1/nodes/{NODE}/status", json=addresses).raise_for_status()
        self._lift_uninitialized_taint()

    def _lift_uninitialized_taint(self) -> None:
        headers = {"Authorization": f"Bearer {self.admin_token}", "Content-Type": "application/merge-patch+json"}
        with httpx.Client(base_url=self.server, headers=headers, verify=self.ssl(), timeout=10) as api:
            node = api.get(f"/api/v1/nodes/{NODE}").json()
            taints = [t for t in node["spec"].get("taints") or () if t["key"] != UNINITIALIZED]
            # resourceVersion: the patch applies to the node as read, or fails (409) and is retried.
            version = node["metadata"]["resourceVersion"]
            api.patch(f"/api/v1/nodes/{NODE}", json={"metadata": {"resourceVersion": version},
                                                     "spec": {"taints": taints or None}})

    def _node_schedulable(self) -> bool:
        """No taint keeps Pods off the node, and none has come back for 3 s.

        The node lifecycle controller patches the node's taint list from its informer's
        copy; a copy taken before the uninitialized taint was lifted puts it back (seen in
        a fresh-clone run: every Pod Pending, "had taint node.cloudprovider.kubernetes.io/
        uninitialized"). So lift it again whenever it is back, and trust a clean node only
        once it stays clean."""
        node = self._get(f"/api/v1/nodes/{NODE}") or {}
        taints = (node.get("spec") or {}).get("taints") or ()
        if any(t["key"] == UNINITIALIZED for t in taints):
            self._lift_uninitialized_taint()
        if any(t.get("effect") in ("NoSchedule", "NoExecute") for t in taints):
            self._clean_since = None
            return False
        now = time.monotonic()
        self._clean_since = self._clean_since or now
        return now - self._clean_since >= 3.0

    # -- helpers -----------------------------------------------------------------------------
    def write_kubeconfig(self, name: str, token: str, namespace: str = "default") -> Path:
        path = self.tmp / f"{name}.kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.server,
                                                      "certificate-authority": str(self.tmp / "ca.crt")}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": name, "namespace": namespace}}]}))
        return path

    def _spawn(self, name: str, argv: list[Any]) -> None:
        with open(self.tmp / f"{name}.log", "wb") as log:
            # Its own process group: stop() signals the component and nothing else.
            self.procs[name] = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=log,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self, name: str, lines: int = 40) -> str:
        path = self.tmp / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _wait(self, check: Callable[[], bool], what: str, component: str, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while not check():
            proc = self.procs.get(component)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{component} exited ({proc.returncode}) while waiting for {what}; its log "
                                   f"ends:\n{self.log(component)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come within {within:.0f} s; the {component} log ends:\n"
                                   f"{self.log(component)}")
            time.sleep(0.2)

    def ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tmp / "ca.crt"))

    def _get(self, path: str) -> Any:
        try:
            response = httpx.get(self.server + path, headers={"Authorization": f"Bearer {self.admin_token}"},
                                 verify=self.ssl(), timeout=5)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def _node_ready(self) -> bool:
        node = self._get(f"/api/v1/nodes/{NODE}")
        status = (node or {}).get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
        return ready and {"type": "InternalIP", "address": "127.0.0.1"} in (status.get("addresses") or ())

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        done = subprocess.run(["kubectl", f"--kubeconfig={self.tmp / 'admin.kubeconfig'}", *args], input=input,
                              capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {done.stderr}")
        return done.stdout

    # -- stop ------------------------------------------------------------------------------
    def stop(self) -> None:
        # The kubelet first, then what it ran: every container it started (name k8s_*,
        # labelled with the Pod's namespace), then its mounts (secret and token volumes are
        # tmpfs under its root), then the control plane.
        self._end("kubelet")
        self._remove_pod_containers()
        self._unmount(self.kubelet_dir)
        for name in ("scheduler", "controller-manager", "apiserver", "etcd"):
            self._end(name)
        if self._lock is not None:
            self._lock.close()  # and with it the lock
            self._lock = None

    @staticmethod
    def _remove_pod_containers() -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            ids = subprocess.run(["docker", "ps", "-aq", "--filter", "label=io.kubernetes.pod.namespace"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=120)

    def _end(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    @staticmethod
    def _unmount(root: Path) -> None:
        top = str(root.resolve())
        with open("/proc/self/mounts") as mounts:  # the kubelet also makes its root a mount of its own
            points = [p for p in (line.split()[1] for line in mounts) if p == top or p.startswith(top + "/")]
        for point in sorted(points, key=len, reverse=True):  # the deepest first
            subprocess.run(["umount", "-l", point], capture_output=True)
