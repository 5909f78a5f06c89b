"""KubernetesBackend on a real cluster: runner Pods scheduled by kube-scheduler and run by a
kubelet as Docker containers (``cluster.py``).

The parent is a real Pod on the node, which this test process plays the part of: its
container only sleeps, and the backend under test names it (``parent_pod=``). The backend
authenticates as the service account of ``docs/kubernetes-rbac.yaml`` with a TokenRequest
token, and nothing more, so the manifest is proven sufficient. Containers run the empty
image with this machine's system, interpreter and checkout mounted read-only (``conftest``),
so a runner runs the code under test and can import the functions below. Every Pod is on
the node's network (``host_network=True``): the node's address is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.codecs import load_all_yaml
from lightkube.resources.core_v1 import ConfigMap, Namespace, Pod, Secret, ServiceAccount, ServiceAccountToken
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding

from flame_asgi import BootError, FlamePool, RunnerLost, parent, subscribe
from flame_asgi._base.parent import ParentInfo
from flame_asgi.backends.kubernetes import KubernetesBackend
from tests.backends.kubernetes.cluster import NODE, REPO, Cluster
from tests.backends.kubernetes.conftest import host_volumes

# func_only: the first test's setup may build the cluster (minutes); each test itself is short.
pytestmark = [pytest.mark.kubernetes, pytest.mark.timeout(90, func_only=True)]

NS, PARENT, IMAGE = "flame-test", "flame-parent", "local/host-mounts:1"
MANAGED = {"app.kubernetes.io/managed-by": "flame_asgi"}
Factory = Callable[..., KubernetesBackend]


# -- functions run on runners -------------------------------------------------------------
def where() -> dict[str, Any]:
    info = parent()
    assert info is not None
    return {"pod": os.environ.get("POD_NAME"), "runner": info.runner_id, "cwd": os.getcwd(),
            "version": os.environ.get("FLAME_CODE_VERSION"), "container": os.path.exists("/.dockerenv"),
            # The runner got its own keys (it answered), not the root secret, and removed them as it read them.
            "keys": sorted(k for k in ("FLAME_SECRET", "FLAME_RUNNER_KEYS") if os.environ.get(k))}  # "" is unset


def count(n: int) -> Iterator[int]:
    yield from range(n)


async def nap(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return str(os.environ.get("POD_NAME"))


def hog(mib: int) -> int:
    chunks = [b"x" * 2**20 for _ in range(mib)]  # written, so every page is charged to the container
    return len(chunks)


# -- the namespace, the manifest's service account, the parent Pod ------------------------
def pythonpath() -> str:
    return os.pathsep.join(dict.fromkeys([str(REPO), *(p for p in sys.path if p.startswith(str(REPO)))]))


def rbac_manifest(namespace: str, name: str = "flame", drop: tuple[str, str] | None = None) -> list[Any]:
    """docs/kubernetes-rbac.yaml for ``namespace``, renamed, optionally without one verb on one resource."""
    out = []
    for obj in load_all_yaml((REPO / "docs" / "kubernetes-rbac.yaml").read_text()):
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


def parent_pod() -> dict[str, Any]:
    volumes, mounts = host_volumes()
    return {
        "metadata": {"name": PARENT, "namespace": NS, "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": "flame", "hostNetwork": True, "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app", "image": IMAGE, "workingDir": str(REPO),
                # This process stands in for the parent's: the container only holds the Pod up.
                "command": [sys.executable, "-c", "import time; time.sleep(10**6)"],
                "env": [{"name": "PYTHONPATH", "value": pythonpath()}, {"name": "APP_MODE", "value": "web"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
                "volumeMounts": [*mounts, {"name": "config", "mountPath": "/app-config"},
                                 {"name": "data", "mountPath": "/data"}]}],
            "volumes": [*volumes, {"name": "config", "configMap": {"name": "app-config"}},
                        {"name": "data", "hostPath": {"path": "/tmp", "type": "Directory"}}]}}  # storage


def runner_template(**container: Any) -> dict[str, Any]:
    """What runner Pods need beyond the parent's copy here: the host's paths (not copied:
    hostPath volumes are storage), plus ``container`` fields."""
    volumes, mounts = host_volumes()
    return {"spec": {"volumes": [*volumes, {"name": "config", "configMap": {"name": "app-config"}}],
                     "containers": [{"volumeMounts": [*mounts, {"name": "config", "mountPath": "/app-config"}],
                                     **container}]}}


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    """The namespace, docs/kubernetes-rbac.yaml applied as it is (renamed), and the running parent Pod."""
    async def populate() -> None:
        async with AsyncClient(admin_config(cluster)) as api:
            await api.create(Namespace.from_dict({"metadata": {"name": NS}}))
            for obj in rbac_manifest(NS):
                await api.create(obj)
            await api.create(ConfigMap.from_dict({"metadata": {"name": "app-config", "namespace": NS},
                                                  "data": {"mode": "web"}}))
            await api.create(Pod.from_dict(parent_pod()))
            await eventually(lambda: pod_phase(api, PARENT, "Running"), within=60)

    asyncio.run(populate())
    yield NS
    cluster.kubectl("delete", "namespace", NS, "--wait=true", "--timeout=60s", check=False)


def admin_config(cluster: Cluster) -> KubeConfig:
    return KubeConfig.from_file(cluster.write_kubeconfig("admin", cluster.admin_token, NS))


async def pod_phase(api: AsyncClient, name: str, phase: str) -> bool:
    pod = await api.get(Pod, name, namespace=NS)
    return bool(pod.status and pod.status.phase == phase)


async def token_for(api: AsyncClient, name: str) -> str:
    request = await api.create(ServiceAccountToken.from_dict({"metadata": {"name": name, "namespace": NS},
                                                                "spec": {"audiences": []}}), name, namespace=NS)
    return str(request.status.token)


@pytest.fixture
async def k8s(cluster: Cluster, namespace: str) -> AsyncIterator[AsyncClient]:
    """An admin client for the tests' own checks; afterwards no runner Pod, Secret or container may remain."""
    async with AsyncClient(admin_config(cluster)) as api:
        yield api
        assert await runner_objects(api, Pod) == [], "runner pods left behind"
        assert await runner_objects(api, Secret) == [], "runner secrets left behind"
        await eventually(lambda: asyncio.sleep(0, runner_containers() == []), within=15)


@pytest.fixture(autouse=True)
def code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # A named build, as in a real deployment: the source fingerprint would change under a
    # runner whenever the working tree is edited while the tests run.
    monkeypatch.setenv("FLAME_CODE_VERSION", "k8s-test")


@pytest.fixture
async def backend(cluster: Cluster, k8s: AsyncClient, tmp_path: Path) -> Factory:
    """Backends authenticated as the manifest's service account, and nothing more."""
    config = cluster.write_kubeconfig("flame", await token_for(k8s, "flame"), NS)

    def make(**options: Any) -> KubernetesBackend:
        options = {"parent_pod": PARENT, "namespace": NS, "kubeconfig": config, "host_network": True,
                   "template": runner_template(), "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0, **options}
        return KubernetesBackend(**options)
    return make


async def runner_objects(api: AsyncClient, kind: Any) -> list[str]:
    return [o.metadata.name async for o in api.list(kind, namespace=NS, labels=MANAGED)]


def runner_containers(pod: str | None = None) -> list[str]:
    """The Docker containers the kubelet runs for runner Pods (of ``pod``), running ones only."""
    labels = ["io.kubernetes.container.name=runner", f"io.kubernetes.pod.namespace={NS}"]
    if pod is not None:
        labels.append(f"io.kubernetes.pod.name={pod}")
    argv = ["docker", "ps", "-q", *(arg for label in labels for arg in ("--filter", f"label={label}"))]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


# -- tests ----------------------------------------------------------------------------------
async def test_call_and_stream_through_a_runner_pod_in_a_real_container(
        k8s: AsyncClient, backend: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAME_CODE_VERSION", "k8s-test-1")
    async with FlamePool("k8s-call", backend=backend(), boot_timeout=60) as pool:
        seen = await pool.call(where)
        assert [item async for item in pool.stream(count, 5)] == [0, 1, 2, 3, 4]
        [runner] = pool.stats().runners
        [name] = await runner_objects(k8s, Pod)
        # It ran in a container the kubelet started (Docker's marker file), in the Pod named by
        # the downward API (POD_NAME, inherited from the parent's spec), with its own keys only.
        assert seen == {"pod": name, "runner": runner.id, "cwd": str(REPO), "keys": [], "version": "k8s-test-1",
                        "container": True}
        assert len(runner_containers(name)) == 1

        pod = (await k8s.get(Pod, name, namespace=NS)).to_dict()
        parent_uid = (await k8s.get(Pod, PARENT, namespace=NS)).metadata.uid
        owner = {"apiVersion": "v1", "kind": "Pod", "name": PARENT, "uid": parent_uid}
        assert pod["metadata"]["ownerReferences"] == [{**owner, "controller": True}]
        assert pod["metadata"]["labels"]["flame-asgi/pool"] == "k8s-call" and "app" not in pod["metadata"]["labels"]
        spec = pod["spec"]
        assert (spec["serviceAccountName"], spec["restartPolicy"], spec["nodeName"]) == ("flame", "Never", NODE)
        assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
        [container] = spec["containers"]
        [port] = container["ports"]
        # On the node's network: the node's address (127.0.0.1 here) and a port of its own.
        assert runner.url == f"http://127.0.0.1:{port['hostPort']}" and port["hostPort"] in range(20000, 30000)
        assert container["image"] == IMAGE and container["resources"] == {
            "requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}
        assert container["command"][1:4] == ["-m", "flame_asgi.backends._serve", "flame_asgi._bare:app"]
        assert container["command"][4:6] == ["--host", "$(FLAME_POD_IP)"]  # the node's address, not 0.0.0.0
        assert "data" not in {v["name"] for v in spec["volumes"]}  # storage stays with the parent
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


async def test_scales_from_zero_to_max_and_back_with_idle_shutdown(k8s: AsyncClient, backend: Factory) -> None:
    async with FlamePool("k8s-grow", backend=backend(), max=2, max_concurrency=1, idle_shutdown_after=1,
                         boot_timeout=60) as pool:
        assert await runner_objects(k8s, Pod) == []
        pods = await asyncio.gather(*(pool.call(nap, 1) for _ in range(3)))
        assert len(set(pods)) == 2
        assert len(await runner_objects(k8s, Pod)) <= 2

        async def all_gone() -> bool:
            objects = await runner_objects(k8s, Pod) + await runner_objects(k8s, Secret)
            return objects == [] and pool.stats().runners == [] and runner_containers() == []
        await eventually(all_gone, within=30)


async def test_a_crashed_runner_fails_its_call_with_the_reason(k8s: AsyncClient, backend: Factory) -> None:
    async with FlamePool("k8s-kill", backend=backend(), boot_timeout=60) as pool:
        first = await pool.call(nap, 0)
        call = asyncio.create_task(pool.call(nap, 60))
        await asyncio.sleep(0.5)
        [container] = runner_containers(first)
        subprocess.run(["docker", "kill", "--signal", "KILL", container], check=True, capture_output=True)
        with pytest.raises(RunnerLost, match=rf"runner pod {first} was killed by SIGKILL \(exit code 137\)"):
            await asyncio.wait_for(call, 30)  # at once: the call itself would take a minute
        second = await pool.call(nap, 0)
        assert second != first  # a fresh Pod
        call = asyncio.create_task(pool.call(nap, 60))
        await asyncio.sleep(0.5)
        await k8s.delete(Pod, second, namespace=NS, grace_period=0)  # deleted by someone else
        with pytest.raises(RunnerLost, match=rf"runner pod {second} (was deleted|is being deleted|was killed)"):
            await asyncio.wait_for(call, 30)


async def test_a_container_over_its_memory_limit_is_an_oom_kill(k8s: AsyncClient, backend: Factory) -> None:
    stops: list[dict[str, Any]] = []
    unsubscribe = subscribe(lambda name, fields: stops.append(fields) if name == "runner.stop" else None)
    try:
        async with FlamePool("k8s-oom", backend=backend(memory="256Mi"), boot_timeout=60) as pool:
            assert await pool.call(hog, 16) == 16
            with pytest.raises(RunnerLost, match=r"was killed: out of memory \(OOMKilled, memory limit of 256Mi\)"):
                await pool.call(hog, 1024)
    finally:
        unsubscribe()
    assert stops[0]["reason"] == "oom"  # the kind the kubelet's OOMKilled maps to, for metrics and code


@pytest.mark.parametrize("missing", [("get", "pods"), ("create", "secrets"), ("create", "pods"),
                                     ("watch", "pods")])
async def test_a_missing_permission_is_a_boot_error_naming_it(
        k8s: AsyncClient, cluster: Cluster, backend: Factory, missing: tuple[str, str]) -> None:
    name = "flame-partial"
    for obj in rbac_manifest(NS, name, drop=missing):
        await k8s.create(obj)
    try:
        config = cluster.write_kubeconfig(name, await token_for(k8s, name), NS)
        async with FlamePool("k8s-rbac", backend=backend(kubeconfig=config), boot_timeout=20) as pool:
            verb, resource = missing
            with pytest.raises(BootError, match=rf"forbids '{verb}' on '{resource}'.*kubernetes-rbac.yaml"):
                await pool.call(where, timeout=3)
    finally:
        for kind in (RoleBinding, Role, ServiceAccount):
            await k8s.delete(kind, name, namespace=NS)


async def test_a_request_no_node_can_meet_is_unschedulable_from_the_scheduler(
        k8s: AsyncClient, backend: Factory) -> None:
    async with FlamePool("k8s-unsched", backend=backend(cpu="64"), boot_timeout=5) as pool:
        with pytest.raises(BootError, match=r"no IP within boot_timeout=5 s: Unschedulable: 0/1 nodes are "
                                            r"available: 1 Insufficient cpu"):
            await pool.call(where)


async def test_an_image_that_is_not_there_is_a_boot_error_saying_so(k8s: AsyncClient, backend: Factory) -> None:
    b = backend(image="local/absent:1", template=runner_template(imagePullPolicy="Never"))
    async with FlamePool("k8s-image", backend=b, boot_timeout=30) as pool:
        with pytest.raises(BootError, match=r'failed to start: ErrImageNeverPull: Container image "local/absent:1" '
                                            r"is not present with pull policy of Never"):
            await pool.call(where, timeout=5)


async def test_a_runner_that_exits_during_boot_is_a_boot_error(k8s: AsyncClient, backend: Factory) -> None:
    b = backend(command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    async with FlamePool("k8s-exit", backend=b, boot_timeout=30) as pool:
        # Known when the container ends, not at boot_timeout: the reason is the exit itself.
        with pytest.raises(BootError, match=r"failed to start: runner pod \S+ exited with code 3 \(Error\)"):
            await pool.call(where, timeout=8)


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
    backend = KubernetesBackend(parent_pod={parent!r}, namespace={ns!r}, kubeconfig={config!r}, host_network=True,
                                template={template!r}, heartbeat_interval=0.5, heartbeat_timeout=3.0)
    pool = FlamePool("k8s-orphan", backend=backend, boot_timeout=60)
    await pool.start()
    print(await pool.call(nap, 0), flush=True)
    await asyncio.sleep(120 if sys.argv[1] == "kill" else 0)  # the pool is never closed

asyncio.run(main())
"""


@pytest.mark.parametrize("death", ["exit", "kill"])
async def test_runners_go_when_their_parent_process_goes(
        k8s: AsyncClient, cluster: Cluster, backend: Factory, death: str, tmp_path: Path) -> None:
    config = cluster.write_kubeconfig("orphan", await token_for(k8s, "flame"), NS)
    (tmp_path / "template.json").write_text(json.dumps(runner_template()))
    script = PARENT_SCRIPT.format(module=nap.__module__, parent=PARENT, ns=NS, config=str(config),
                                  template=str(tmp_path / "template.json"))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, death, stdout=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": pythonpath()})
    try:
        assert proc.stdout is not None
        name = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
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
        await eventually(ended, within=30)
        assert runner_containers(name) == []
        # The parent Pod lives on, so its runner's Pod object stays (the garbage collector
        # deletes it with the parent Pod: test_deployment.py); the next process in that Pod
        # (a restarted container) deletes it, and its Secret, when its pool starts.
        b = backend()
        await b.start()
        await b.aclose()
        assert await runner_objects(k8s, Pod) == [] and await runner_objects(k8s, Secret) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
