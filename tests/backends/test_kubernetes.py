"""KubernetesBackend against a real kube-apiserver 1.20 and etcd, started by the fixture.

``.ci/kubernetes.sh`` builds the API server from Debian's source package (once; cached
under ``~/.cache``). There is no kubelet: ``k8s_node_agent.NodeAgent`` registers a Node
and runs each Pod bound to it as a local process with the Pod's command and environment,
on a loopback address of its own. The backend under test only talks to the API server,
as the service account of ``docs/kubernetes-rbac.yaml`` with a TokenRequest token: no
other permission, so the manifest is proven sufficient. The "parent" is a Pod object
(scheduled elsewhere, never run) that this test process plays the part of.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flame_asgi import BootError, FlamePool, RunnerLost, parent
from flame_asgi._parent import ParentInfo
from flame_asgi.backends._base import RunnerSpec

pytest.importorskip("lightkube", reason="KubernetesBackend needs lightkube: pip install 'flame_asgi[kubernetes]'")

from lightkube import AsyncClient, KubeConfig
from lightkube.codecs import load_all_yaml
from lightkube.config.models import Cluster as ClusterConfig
from lightkube.config.models import User
from lightkube.resources.core_v1 import Namespace, Pod, Secret, ServiceAccount, ServiceAccountToken
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding

from flame_asgi.backends._kubernetes_pods import describe_end
from flame_asgi.backends.kubernetes import KubernetesBackend
from tests.backends.k8s_node_agent import NodeAgent

# func_only: the first test's setup may build the API server (minutes); each test itself is short.
pytestmark = [pytest.mark.kubernetes, pytest.mark.timeout(60, func_only=True)]

REPO = Path(__file__).resolve().parents[2]
CACHED = Path.home() / ".cache" / "flame-asgi" / "kube-apiserver-1.20.2" / "kube-apiserver"
BUILD_UNAVAILABLE = 3  # .ci/kubernetes.sh's exit code when the tools or the source cannot be had
NS, PARENT, IMAGE = "flame-test", "flame-parent", "local/flame-app:1"
MANAGED = {"app.kubernetes.io/managed-by": "flame_asgi"}
Factory = Callable[..., KubernetesBackend]


# -- functions run on runners -------------------------------------------------------------
def where() -> dict[str, Any]:
    info = parent()
    assert info is not None
    return {"pod": os.environ.get("POD_NAME"), "runner": info.runner_id, "cwd": os.getcwd(),
            "version": os.environ.get("FLAME_CODE_VERSION"),
            # The runner got its own keys (it answered), not the root secret, and removed them as it read them.
            "keys": sorted(k for k in ("FLAME_SECRET", "FLAME_RUNNER_KEYS") if os.environ.get(k))}  # "" is unset


def count(n: int) -> Iterator[int]:
    yield from range(n)


async def nap(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return str(os.environ.get("POD_NAME"))


# -- the cluster ----------------------------------------------------------------------------
@dataclasses.dataclass
class Cluster:
    server: str
    admin: KubeConfig
    agent: NodeAgent
    tmp: Path
    port: int  # where runners listen, each on its own 127.0.0.N
    parent_uid: str

    def kubeconfig(self, token: str, name: str) -> Path:
        path = self.tmp / f"{name}.kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": name, "namespace": NS}}]}))
        return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def pythonpath() -> str:
    return os.pathsep.join(dict.fromkeys([str(REPO), *(p for p in sys.path if p.startswith(str(REPO)))]))


def apiserver_binary() -> Path:
    if CACHED.is_file() and shutil.which("etcd"):
        return CACHED
    try:
        done = subprocess.run(["bash", str(REPO / ".ci" / "kubernetes.sh")], capture_output=True, text=True,
                              timeout=3000)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"kube-apiserver cannot be built here: {exc}")
    if done.returncode == BUILD_UNAVAILABLE:
        pytest.skip(f"kube-apiserver cannot be built here: {done.stderr.strip()[-600:]}")
    assert done.returncode == 0, f".ci/kubernetes.sh failed:\n{done.stderr[-3000:]}"
    return Path(done.stdout.strip().splitlines()[-1])


def wait_until(check: Callable[[], bool], what: str, log: Path, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up; its log ends:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def answers(url: str, token: str | None = None) -> bool:
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(url, headers=headers, verify=False, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """etcd + kube-apiserver on 127.0.0.1 high ports, a node agent, the RBAC manifest, a parent Pod."""
    binary = apiserver_binary()
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (.ci/kubernetes.sh installs etcd-server)")
    tmp = tmp_path_factory.mktemp("k8s")
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    admin_token = secrets.token_hex(16)
    (tmp / "tokens.csv").write_text(f'{admin_token},admin,admin,"system:masters"\n')
    subprocess.run(["openssl", "genrsa", "-out", tmp / "sa.key", "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", tmp / "sa.key", "-pubout", "-out", tmp / "sa.pub"], check=True,
                   capture_output=True)
    procs: list[subprocess.Popen[bytes]] = []
    agent: NodeAgent | None = None
    try:
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        with open(tmp / "etcd.log", "wb") as log:
            procs.append(subprocess.Popen([
                "etcd", "--name", "flame", "--data-dir", tmp / "etcd", "--listen-client-urls", etcd_url,
                "--advertise-client-urls", etcd_url, "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-cluster", f"flame=http://127.0.0.1:{peer_port}"], stdout=log, stderr=log))
        wait_until(lambda: answers(f"{etcd_url}/health"), "etcd", tmp / "etcd.log")
        server = f"https://127.0.0.1:{api_port}"
        with open(tmp / "apiserver.log", "wb") as log:
            procs.append(subprocess.Popen([
                binary, f"--etcd-servers={etcd_url}", f"--secure-port={api_port}", "--insecure-port=0",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--cert-dir={tmp / 'certs'}",
                f"--token-auth-file={tmp / 'tokens.csv'}", "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={tmp / 'sa.pub'}",
                f"--service-account-signing-key-file={tmp / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24", "--disable-admission-plugins=ServiceAccount"],
                stdout=log, stderr=log))
        wait_until(lambda: answers(f"{server}/readyz", admin_token), "kube-apiserver", tmp / "apiserver.log")
        admin = KubeConfig.from_one(cluster=ClusterConfig(server=server, insecure=True), user=User(token=admin_token),
                                    namespace=NS)
        agent = NodeAgent(admin, tmp, images={IMAGE})
        agent.start()
        uid = asyncio.run(populate(admin))
        yield Cluster(server, admin, agent, tmp, free_port(), uid)
    finally:
        if agent is not None:
            agent.stop()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rbac_manifest(namespace: str, name: str = "flame", drop: tuple[str, str] | None = None) -> list[Any]:
    """docs/kubernetes-rbac.yaml for ``namespace``, renamed, optionally without one verb on one resource."""
    objects = load_all_yaml((REPO / "docs" / "kubernetes-rbac.yaml").read_text())
    out = []
    for obj in objects:
        d = obj.to_dict()
        d["metadata"].update(namespace=namespace, name=name)
        for subject in d.get("subjects") or ():
            subject.update(namespace=namespace, name=name)
        if "roleRef" in d:
            d["roleRef"]["name"] = name
        for rule in d.get("rules") or ():
            if drop is not None and drop[1] in rule["resources"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != drop[0]]
        out.append(type(obj).from_dict(d))
    return out


async def populate(admin: KubeConfig) -> str:
    async with AsyncClient(admin) as api:
        await api.create(Namespace.from_dict({"metadata": {"name": NS}}))
        for obj in rbac_manifest(NS):
            await api.create(obj)
        pod = await api.create(Pod.from_dict({
            "metadata": {"name": PARENT, "namespace": NS, "labels": {"app": "web"}},
            "spec": {
                "nodeName": "elsewhere",  # the test process plays this Pod: the agent must not run it
                "serviceAccountName": "flame",
                "containers": [{
                    "name": "app", "image": IMAGE, "workingDir": str(REPO),
                    "env": [{"name": "PYTHONPATH", "value": pythonpath()}, {"name": "APP_MODE", "value": "web"},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/app"},
                                     {"name": "data", "mountPath": "/data"}]}],
                "volumes": [{"name": "config", "configMap": {"name": "app-config"}},
                            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}}))
        return str(pod.metadata.uid)


async def token_for(admin: KubeConfig, name: str) -> str:
    async with AsyncClient(admin) as api:
        request = await api.create(ServiceAccountToken.from_dict({"metadata": {"name": name, "namespace": NS},
                                                                    "spec": {"audiences": []}}), name, namespace=NS)
        return str(request.status.token)


@pytest.fixture
async def k8s(cluster: Cluster) -> AsyncIterator[AsyncClient]:
    """An admin client for the tests' own checks; afterwards no runner Pod, Secret or process may remain."""
    async with AsyncClient(cluster.admin) as api:
        yield api
        assert await runner_objects(api, Pod) == [], "runner pods left behind"
        assert await runner_objects(api, Secret) == [], "runner secrets left behind"
        await eventually(lambda: asyncio.sleep(0, not cluster.agent.running()), within=5)
    assert cluster.agent.error is None, f"node agent failed: {cluster.agent.error!r}"


@pytest.fixture(autouse=True)
def code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # A named build, as in a real deployment: the source fingerprint would change under a
    # runner whenever the working tree is edited while the tests run.
    monkeypatch.setenv("FLAME_CODE_VERSION", "k8s-test")


@pytest.fixture
async def backend(cluster: Cluster) -> Factory:
    """Backends authenticated as the manifest's service account, and nothing more."""
    config = cluster.kubeconfig(await token_for(cluster.admin, "flame"), "flame")

    def make(**options: Any) -> KubernetesBackend:
        options = {"parent_pod": PARENT, "namespace": NS, "kubeconfig": config, "port": cluster.port,
                   "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0, **options}
        return KubernetesBackend(**options)
    return make


async def runner_objects(api: AsyncClient, kind: Any) -> list[str]:
    return [o.metadata.name async for o in api.list(kind, namespace=NS, labels=MANAGED)]


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- tests ----------------------------------------------------------------------------------
async def test_call_and_stream_through_a_runner_pod_cloned_from_the_parent(
        k8s: AsyncClient, backend: Factory, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAME_CODE_VERSION", "k8s-test-1")
    async with FlamePool("k8s-call", backend=backend(), boot_timeout=20) as pool:
        started = time.perf_counter()
        seen = await pool.call(where)
        cold = time.perf_counter() - started
        print(f"cold call through a runner pod: {cold * 1000:.0f} ms")
        assert [item async for item in pool.stream(count, 5)] == [0, 1, 2, 3, 4]
        [runner] = pool.stats().runners
        assert runner.id == seen["runner"] and runner.url is not None
        assert runner.url.startswith("http://127.0.0.") and runner.url.endswith(f":{cluster.port}")
        # The runner's own POD_NAME (downward API, inherited from the parent's spec) names its Pod.
        [name] = await runner_objects(k8s, Pod)
        assert seen == {"pod": name, "runner": runner.id, "cwd": str(REPO), "keys": [], "version": "k8s-test-1"}

        pod = (await k8s.get(Pod, name, namespace=NS)).to_dict()
        owner = {"apiVersion": "v1", "kind": "Pod", "name": PARENT, "uid": cluster.parent_uid}
        assert pod["metadata"]["ownerReferences"] == [{**owner, "controller": True}]
        assert pod["metadata"]["labels"]["flame-asgi/pool"] == "k8s-call" and "app" not in pod["metadata"]["labels"]
        spec = pod["spec"]
        assert (spec["serviceAccountName"], spec["restartPolicy"]) == ("flame", "Never")
        [container] = spec["containers"]
        assert container["image"] == IMAGE and container["resources"] == {
            "requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}
        assert container["command"][1:4] == ["-m", "uvicorn", "flame_asgi._bare:app"]
        assert [v["name"] for v in spec["volumes"]] == ["config"]  # the PVC stays with the parent
        env = {e["name"]: e for e in container["env"]}
        assert env["APP_MODE"]["value"] == "web" and env["FLAME_CODE_VERSION"]["value"] == "k8s-test-1"
        assert env["FLAME_SECRET"] == {"name": "FLAME_SECRET"}  # blanked (the API drops ""): the root never goes
        for key in ("FLAME_PARENT", "FLAME_RUNNER_KEYS"):  # by reference only: never in the Pod's spec
            assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}

        secret = (await k8s.get(Secret, name, namespace=NS)).to_dict()
        assert secret["metadata"]["ownerReferences"] == [owner]
        assert set(secret["data"]) == {"FLAME_PARENT", "FLAME_RUNNER_KEYS"}  # its own keys, not the root
        info = ParentInfo.decode(base64.b64decode(secret["data"]["FLAME_PARENT"]).decode())
        assert (info.runner_id, info.backend, info.code_version) == (runner.id, "kubernetes", "k8s-test-1")
    assert await runner_objects(k8s, Pod) == [] and await runner_objects(k8s, Secret) == []


async def test_grows_to_max_and_idle_runners_go_with_their_secrets(k8s: AsyncClient, backend: Factory) -> None:
    async with FlamePool("k8s-grow", backend=backend(), max=2, max_concurrency=1, idle_shutdown_after=0.5,
                         boot_timeout=20) as pool:
        pods = await asyncio.gather(*(pool.call(nap, 0.5) for _ in range(3)))
        assert len(set(pods)) == 2
        assert len(await runner_objects(k8s, Pod)) <= 2

        async def all_gone() -> bool:
            objects = await runner_objects(k8s, Pod) + await runner_objects(k8s, Secret)
            return objects == [] and pool.stats().runners == []
        await eventually(all_gone, within=15)


async def test_a_killed_runner_fails_the_call_at_once(k8s: AsyncClient, backend: Factory, cluster: Cluster) -> None:
    async with FlamePool("k8s-kill", backend=backend(), boot_timeout=20) as pool:
        first = await pool.call(nap, 0)
        call = asyncio.create_task(pool.call(nap, 30))
        await asyncio.sleep(0.3)
        killed = time.perf_counter()
        cluster.agent.kill(first)
        with pytest.raises(RunnerLost, match=rf"runner pod {first} was killed by SIGKILL \(exit code 137\)"):
            await call
        assert time.perf_counter() - killed < 3.0
        second = await pool.call(nap, 0)
        assert second != first  # a fresh Pod
        call = asyncio.create_task(pool.call(nap, 30))
        await asyncio.sleep(0.3)
        await k8s.delete(Pod, second, namespace=NS, grace_period=0)  # deleted by someone else
        with pytest.raises(RunnerLost, match=rf"runner pod {second} was deleted"):
            await call


@pytest.mark.parametrize("missing", [("get", "pods"), ("create", "secrets"), ("create", "pods"),
                                     ("watch", "pods")])
async def test_a_missing_permission_is_a_boot_error_naming_it(
        k8s: AsyncClient, cluster: Cluster, backend: Factory, missing: tuple[str, str]) -> None:
    name = "flame-partial"
    objects = rbac_manifest(NS, name, drop=missing)
    for obj in objects:
        await k8s.create(obj)
    try:
        config = cluster.kubeconfig(await token_for(cluster.admin, name), name)
        async with FlamePool("k8s-rbac", backend=backend(kubeconfig=config), boot_timeout=10) as pool:
            verb, resource = missing
            with pytest.raises(BootError, match=rf"forbids '{verb}' on '{resource}'.*kubernetes-rbac.yaml"):
                await pool.call(where, timeout=1.5)
    finally:
        for kind in (RoleBinding, Role, ServiceAccount):
            await k8s.delete(kind, name, namespace=NS)


async def test_an_unschedulable_pod_is_a_boot_error_saying_so(k8s: AsyncClient, backend: Factory) -> None:
    b = backend(template={"spec": {"nodeSelector": {"disktype": "ssd"}}})
    async with FlamePool("k8s-unsched", backend=b, boot_timeout=3) as pool:
        with pytest.raises(BootError, match=r"no IP within boot_timeout=3 s: Unschedulable: 0/1 nodes"):
            await pool.call(where)


async def test_an_image_that_cannot_be_pulled_is_a_boot_error_saying_so(k8s: AsyncClient, backend: Factory) -> None:
    async with FlamePool("k8s-pull", backend=backend(image="registry.invalid/app:1"), boot_timeout=3) as pool:
        with pytest.raises(BootError, match=r"no IP within boot_timeout=3 s: ImagePullBackOff: Back-off pulling"):
            await pool.call(where)


async def test_a_runner_that_exits_during_boot_is_a_boot_error(k8s: AsyncClient, backend: Factory) -> None:
    b = backend(command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    failed: list[float] = []
    async with FlamePool("k8s-exit", backend=b, boot_timeout=10,
                         on_grow_end=lambda error, _: failed.append(time.perf_counter())) as pool:
        started = time.perf_counter()
        with pytest.raises(BootError, match=r"ended during boot: runner pod \S+ exited with code 3 \(Error\)"):
            await pool.call(where, timeout=3)
        assert failed[0] - started < 2.5  # known at once, not at boot_timeout


async def test_a_parent_pod_that_does_not_exist_is_a_boot_error(k8s: AsyncClient, backend: Factory) -> None:
    async with FlamePool("k8s-noparent", backend=backend(parent_pod="ghost"), boot_timeout=5) as pool:
        with pytest.raises(BootError, match=r"parent pod flame-test/ghost does not exist.*POD_NAME"):
            await pool.call(where, timeout=1)


PARENT_SCRIPT = """
import asyncio, sys
from flame_asgi import FlamePool
from flame_asgi.backends.kubernetes import KubernetesBackend
from {module} import nap

async def main():
    backend = KubernetesBackend(parent_pod={parent!r}, namespace={ns!r}, kubeconfig={config!r}, port={port})
    pool = FlamePool("k8s-orphan", backend=backend, boot_timeout=20)
    await pool.start()
    print(await pool.call(nap, 0), flush=True)
    await asyncio.sleep(60 if sys.argv[1] == "kill" else 0)  # the pool is never closed

asyncio.run(main())
"""


@pytest.mark.parametrize("death", ["exit", "kill"])
async def test_runners_go_when_their_parent_process_goes(
        k8s: AsyncClient, cluster: Cluster, backend: Factory, death: str) -> None:
    config = cluster.kubeconfig(await token_for(cluster.admin, "flame"), "orphan")
    script = PARENT_SCRIPT.format(module=nap.__module__, parent=PARENT, ns=NS, config=str(config), port=cluster.port)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, death, stdout=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": pythonpath()})
    try:
        assert proc.stdout is not None
        name = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert await runner_objects(k8s, Pod) == [name]
        if death == "exit":  # its atexit hook deletes the Pod and the Secret
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            assert await runner_objects(k8s, Pod) == [] and await runner_objects(k8s, Secret) == []
            return
        proc.kill()  # no exit hook runs: the runner sees its channel close and exits by itself
        await proc.wait()

        async def ended() -> bool:
            pod = (await k8s.get(Pod, name, namespace=NS)).to_dict()
            return pod["status"].get("phase") in ("Succeeded", "Failed")
        await eventually(ended, within=15)
        # Without a garbage collector here, the Pod stays; the next process in the parent
        # Pod (a restarted container) deletes it, and its Secret, when its pool starts.
        b = backend()
        await b.start()
        await b.aclose()
        assert await runner_objects(k8s, Pod) == [] and await runner_objects(k8s, Secret) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- without a cluster ----------------------------------------------------------------------
def spec_for(runner_id: str = "pool-1-abc") -> RunnerSpec:
    info = ParentInfo(pool="pool", runner_id=runner_id, parent_address="here", backend="kubernetes",
                      code_version="v", app="m:app")
    return RunnerSpec(pool="pool", runner_id=runner_id, info=info, app="m:app", boot_timeout=5, secret="s")


def test_a_template_merges_over_the_generated_pod(tmp_path: Path) -> None:
    parent_pod = {"metadata": {"name": "web-1", "uid": "u-1"}, "spec": {
        "serviceAccountName": "web", "nodeSelector": {"pool": "web"}, "affinity": {"podAntiAffinity": {}},
        "containers": [{"name": "app", "image": "app:1", "resources": {"limits": {"memory": "1Gi"}}}]}}
    template = {"metadata": {"labels": {"team": "media"}}, "spec": {
        "nodeSelector": None, "priorityClassName": "batch",
        "containers": [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}, {"name": "sidecar", "image": "s:1"}]}}
    b = KubernetesBackend(parent_pod="web-1", namespace="ns", memory="2Gi", template=template)
    pod = b.pod_manifest(spec_for(), parent_pod)
    assert pod["metadata"]["name"] == "flame-pool-1-abc" and pod["metadata"]["labels"]["team"] == "media"
    spec = pod["spec"]
    assert "nodeSelector" not in spec and "affinity" not in spec and spec["priorityClassName"] == "batch"
    assert [c["name"] for c in spec["containers"]] == ["runner", "sidecar"]
    assert spec["containers"][0]["resources"] == {"limits": {"memory": "2Gi", "nvidia.com/gpu": "1"},
                                                  "requests": {"memory": "2Gi"}}
    # A file works too (YAML or JSON), as FLAME_K8S_TEMPLATE gives it.
    (tmp_path / "runner.yaml").write_text("spec:\n  priorityClassName: batch\n")
    b = KubernetesBackend(parent_pod="web-1", namespace="ns", template=tmp_path / "runner.yaml")
    assert b.pod_manifest(spec_for(), parent_pod)["spec"]["priorityClassName"] == "batch"


def test_how_a_pod_ended_is_described() -> None:
    def ended(terminated: dict[str, Any], limits: dict[str, str] | None = None) -> dict[str, Any]:
        return {"spec": {"containers": [{"name": "runner", "resources": {"limits": limits or {}}}]},
                "status": {"phase": "Failed", "containerStatuses": [{"name": "runner",
                                                                     "state": {"terminated": terminated}}]}}
    assert str(describe_end(ended({"exitCode": 137, "reason": "OOMKilled"}, {"memory": "256Mi"}), "p")) == (
        "runner pod p was killed: out of memory (OOMKilled, memory limit of 256Mi)")
    assert str(describe_end(ended({"exitCode": 143, "reason": "Error"}), "p")) == (
        "runner pod p was killed by SIGTERM (exit code 143)")
    assert str(describe_end(ended({"exitCode": 3, "reason": "Error"}), "p")) == (
        "runner pod p exited with code 3 (Error)")
    evicted = {"status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}}
    assert str(describe_end(evicted, "p")) == "runner pod p is Failed: Evicted: low on memory"
    assert str(describe_end(None, "p")) == "runner pod p was deleted"


def test_without_lightkube_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightkube", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'flame_asgi\[kubernetes\]'"):
        KubernetesBackend()


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "web-7f9c")
    monkeypatch.setenv("POD_NAMESPACE", "shop")
    b = KubernetesBackend.from_env({"FLAME_K8S_IMAGE": "app:7", "FLAME_K8S_CPU": "500m", "FLAME_K8S_MEMORY": "1Gi",
                                    "FLAME_K8S_PORT": "9000", "FLAME_K8S_APP": "svc.main:app"})
    assert (b.parent_pod, b.namespace, b.image, b.cpu, b.memory, b.port, b.app_import()) == (
        "web-7f9c", "shop", "app:7", "500m", "1Gi", 9000, "svc.main:app")
    b = KubernetesBackend.from_env({"FLAME_K8S_PARENT_POD": "other", "FLAME_K8S_NAMESPACE": "ns2"})
    assert (b.parent_pod, b.namespace) == ("other", "ns2")
