"""KubernetesBackend on a real single-node cluster: a cold call beside the same Pod's own
create-to-Ready time, and a warm call.

The cluster is the one the test suite runs (``tests/backends/kubernetes/cluster.py``:
etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a kubelet running Pods as
Docker containers, on 127.0.0.1), started for this family and stopped after it.

- ``pod_create_to_ready`` (the floor): create a Pod like a runner's (same image, mounts,
  host network, command: uvicorn serving a plain FastAPI app) with a readiness probe on its
  port (period 1 s, the kubelet's shortest), time from create to the Pod's Ready condition,
  then delete it. What Kubernetes itself takes to schedule, start and see a web app up.
- ``cold_call``: a running pool with ``min=0`` and a KubernetesBackend; a call arrives and
  its runner Pod is created, scheduled, started, connected to and handed the call: time to
  the result. A fresh pool each round.
- ``warm_call``: p50 of calls to a booted runner Pod.
- ``payload_100MB``: a 100 MB ``bytes`` argument echoed back by that runner Pod: MB/s =
  size / round trip. The Pod is another pid namespace, so the payload cannot go through
  shared memory: it crosses on the data plane, a TCP connection of its own beside the
  WebSocket, to the Pod's port.

Needs root, Docker and the cluster's build (``bash .ci/kubernetes.sh``, cached); without
them the family is recorded as unavailable, with the reason.
"""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
import sys
import tempfile
import time
from typing import Any

from bench import tasks
from bench._config import Config
from bench._measure import best_time, now, ratio, timed_calls, unavailable
from bench.payload import echo_rates
from flame_asgi import FlamePool

REPO = pathlib.Path(__file__).resolve().parents[1]
NS = "bench"


async def measure(cfg: Config) -> dict[str, Any]:
    if importlib.util.find_spec("lightkube") is None:
        return unavailable("lightkube is not installed (pip install 'flame_asgi[kubernetes]')")
    sys.path.insert(0, str(REPO))  # the cluster lives with the tests
    from tests.backends.kubernetes.cluster import Cluster, ClusterUnavailable

    with tempfile.TemporaryDirectory(prefix="flame-bench-k8s-") as tmp:
        cluster = Cluster(pathlib.Path(tmp))
        try:
            try:
                await asyncio.to_thread(cluster.start)
            except ClusterUnavailable as exc:
                return unavailable(str(exc))
            return await _measure(cluster, cfg)
        finally:
            await asyncio.to_thread(cluster.stop)


async def _measure(cluster: Any, cfg: Config) -> dict[str, Any]:
    from lightkube import AsyncClient, KubeConfig
    from lightkube.resources.core_v1 import Namespace, Pod

    from tests.backends.kubernetes.conftest import host_volumes

    admin = KubeConfig.from_file(cluster.write_kubeconfig("bench", cluster.admin_token, NS))
    volumes, mounts = host_volumes()
    async with AsyncClient(admin) as api:
        await api.create(Namespace.from_dict({"metadata": {"name": NS}}))
        parent = await api.create(Pod.from_dict({
            "metadata": {"name": "bench-parent", "namespace": NS},
            "spec": {"hostNetwork": True, "terminationGracePeriodSeconds": 1, "volumes": volumes,
                     "containers": [{"name": "app", "image": "local/host-mounts:1", "workingDir": str(REPO),
                                     "command": [sys.executable, "-c", "import time; time.sleep(10**6)"],
                                     "env": [{"name": "PYTHONPATH", "value": str(REPO)}],
                                     "volumeMounts": mounts}]}}))
        template = {"spec": {"volumes": volumes, "containers": [{"volumeMounts": mounts}]}}
        floor = best_time([await _create_to_ready(api, volumes, mounts, n) for n in range(cfg.cold_rounds)])
        cold = best_time([await _cold_call(admin, template, parent) for _ in range(cfg.cold_rounds)])
        warm, payload = await _warm(admin, template, cfg)
    return {"available": True, "pod_create_to_ready": floor, "cold_call": cold, "warm_call": warm,
            "payload_100MB": payload,
            "ratios": {"cold_call_over_pod_ready": ratio(cold["best_ms"], floor["best_ms"])}}


def _backend(admin: Any, template: dict[str, Any]) -> Any:
    from flame_asgi.backends.kubernetes import KubernetesBackend

    return KubernetesBackend(parent_pod="bench-parent", namespace=NS, kubeconfig=admin, host_network=True,
                             template=template)


async def _create_to_ready(api: Any, volumes: list[Any], mounts: list[Any], n: int) -> float:
    from lightkube.resources.core_v1 import Pod

    port = 31000 + n
    pod = Pod.from_dict({
        "metadata": {"name": f"floor-{n}", "namespace": NS},
        "spec": {"hostNetwork": True, "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                 "volumes": volumes,
                 "containers": [{
                     "name": "app", "image": "local/host-mounts:1", "workingDir": str(REPO), "volumeMounts": mounts,
                     "command": [sys.executable, "-m", "uvicorn", "bench.fastapi_app:app", "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning", "--no-access-log"],
                     "env": [{"name": "PYTHONPATH", "value": str(REPO)}],
                     "readinessProbe": {"httpGet": {"path": "/", "port": port, "host": "127.0.0.1"},
                                        "periodSeconds": 1, "initialDelaySeconds": 0}}]}})
    start = now()
    await api.create(pod)
    try:
        deadline = time.monotonic() + 120
        while True:
            got = (await api.get(Pod, f"floor-{n}", namespace=NS)).to_dict()
            conditions = (got.get("status") or {}).get("conditions") or ()
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return now() - start
            if time.monotonic() > deadline:
                raise TimeoutError(f"pod floor-{n} was not Ready within 120 s")
            await asyncio.sleep(0.02)
    finally:
        await api.delete(Pod, f"floor-{n}", namespace=NS, grace_period=0)


async def _cold_call(admin: Any, template: dict[str, Any], parent: Any) -> float:
    trivial = tasks.make_closure(1)
    async with FlamePool("bench-k8s-cold", backend=_backend(admin, template), min=0, max=1,
                         boot_timeout=120.0) as pool:
        start = now()
        await pool.call(trivial)
        return now() - start


async def _warm(admin: Any, template: dict[str, Any], cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    trivial = tasks.make_closure(1)
    async with FlamePool("bench-k8s-warm", backend=_backend(admin, template), min=1, max=1,
                         boot_timeout=120.0) as pool:
        samples = await timed_calls(lambda: pool.call(trivial), cfg.latency_calls, cfg.latency_warmup)
        payload = await echo_rates(pool, 100, cfg.payload_rounds[-1], " through KubernetesBackend")
    ordered = sorted(samples)
    return {"p50_us": round(ordered[len(ordered) // 2] * 1e6, 1),
            "p99_us": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, 1),
            "calls": len(samples)}, payload
