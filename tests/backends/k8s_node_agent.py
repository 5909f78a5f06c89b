"""A node agent for the KubernetesBackend tests: the parts of a scheduler and a kubelet they need.

It registers a Ready Node, binds Pending Pods to it (or marks them Unschedulable when
their nodeSelector does not match), and runs each bound Pod's first container as a local
process: its command with its environment (``value``, ``secretKeyRef``, ``configMapKeyRef``,
``fieldRef`` and ``envFrom`` resolved through the API, as a kubelet does), bound to a
loopback address of its own (127.0.0.N: the Pod's IP, so two Pods can listen on one
port). It reports the Pod Running with that IP, then Succeeded or Failed with the exit
code when the process ends, and honours deletion: SIGTERM, SIGKILL after the grace
period, reap, then removes the Pod object. Images other than ``images`` fail to "pull".
It runs its own event loop in a thread, so the tests' loops come and go around it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import itertools
import os
import signal
import threading
from pathlib import Path
from typing import Any

import msgspec
from lightkube import ALL_NS, ApiError, AsyncClient
from lightkube.resources.core_v1 import ConfigMap, Node, Pod, PodBinding, PodStatus, Secret
from lightkube.types import PatchType


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class NodeAgent:
    def __init__(self, config: Any, log_dir: Path, images: set[str], node: str = "flame-node") -> None:
        self.config, self.log_dir, self.images, self.node = config, log_dir, images, node
        self.labels = {"kubernetes.io/hostname": node}
        self.procs: dict[str, asyncio.subprocess.Process] = {}  # pod uid -> its process
        self.names: dict[str, str] = {}  # pod name -> uid
        self.scheduled: set[str] = set()  # pods bound (or found unschedulable)
        self.deleting: set[str] = set()  # pods being deleted: their exit is not reported
        self.tasks: set[asyncio.Future[None]] = set()
        self.ips = (f"127.0.0.{n}" for n in itertools.cycle(range(10, 250)))
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self.loop.run_forever, name="k8s-node-agent", daemon=True)

    # -- control, from the tests' thread ------------------------------------------------
    def start(self) -> None:
        self.thread.start()
        self.task = asyncio.run_coroutine_threadsafe(self.main(), self.loop)
        if not self.ready.wait(15):
            raise RuntimeError(f"the node agent did not start: {self.error!r}")

    def stop(self) -> None:
        self.stopping = True
        self.task.cancel()
        asyncio.run_coroutine_threadsafe(self.reap_all(), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(self.api.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def kill(self, pod: str) -> None:
        """SIGKILL the process of ``pod`` (a crash, as the node sees it)."""
        self.loop.call_soon_threadsafe(self.procs[self.names[pod]].kill)

    def running(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.returncode is None]

    # -- the agent ----------------------------------------------------------------------
    async def main(self) -> None:
        try:
            self.api = AsyncClient(self.config)
            await self.api.create(Node.from_dict({"metadata": {"name": self.node, "labels": self.labels}}))
            cond = {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": now()}
            await self.api.patch(Node.Status, self.node, {"status": {
                "conditions": [cond], "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
                "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"}}}, patch_type=PatchType.MERGE)
            self.ready.set()
            async for event, obj in self.api.watch(Pod, namespace=ALL_NS):
                try:
                    await self.handle(event, obj.to_dict())
                except ApiError as exc:  # 404, 409: the Pod went or changed meanwhile, as on a real node
                    if exc.status.code not in (404, 409):
                        self.error = exc
        except BaseException as exc:
            self.error = exc
            raise

    async def handle(self, event: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        if event == "DELETED":
            await self.reap(uid)
        elif meta.get("deletionTimestamp"):
            if uid not in self.deleting:
                self.deleting.add(uid)
                self.spawn(self.terminate(uid, ns, name, meta.get("deletionGracePeriodSeconds") or 0))
        elif not spec.get("nodeName") and uid not in self.scheduled:
            self.scheduled.add(uid)
            if any(self.labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
                await self.status(ns, name, {"conditions": [{"type": "PodScheduled", "status": "False",
                    "reason": "Unschedulable", "message": "0/1 nodes are available: 1 node(s) didn't match "
                                                          "Pod's node affinity/selector."}]})
            else:
                with contextlib.suppress(msgspec.ValidationError):  # the API answers a Status, not a Binding
                    await self.api.create(PodBinding.from_dict({"metadata": {"name": name}, "target": {
                        "kind": "Node", "name": self.node}}), name, namespace=ns)
        elif spec.get("nodeName") == self.node and uid not in self.names.values():
            self.names[name] = uid
            self.spawn(self.run(pod))

    def spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.done)

    def done(self, task: asyncio.Future[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self.stopping:
            self.error = task.exception()

    async def status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        try:
            await self.api.patch(PodStatus, name, {"status": status}, namespace=ns, patch_type=PatchType.MERGE)
        except ApiError as exc:
            if exc.status.code != 404:
                raise

    async def run(self, pod: dict[str, Any]) -> None:
        meta, container = pod["metadata"], pod["spec"]["containers"][0]
        ns, name, cname = meta["namespace"], meta["name"], container["name"]
        if container["image"] not in self.images:
            why = {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{container["image"]}"'}
            return await self.status(ns, name, {"containerStatuses": [{"name": cname, "ready": False,
                "restartCount": 0, "image": container["image"], "imageID": "", "state": {"waiting": why}}]})
        ip = next(self.ips)
        try:
            env = await self.environment(pod, container, ip)
        except LookupError as exc:
            why = {"reason": "CreateContainerConfigError", "message": str(exc)}
            return await self.status(ns, name, {"containerStatuses": [{"name": cname, "ready": False,
                "restartCount": 0, "image": container["image"], "imageID": "", "state": {"waiting": why}}]})
        cmd = [*(container.get("command") or ()), *(container.get("args") or ())]
        # The Pod's own network: its server binds the Pod's address, not the whole host.
        cmd = [ip if before == "--host" else arg for before, arg in zip(["", *cmd], cmd, strict=False)]
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = await asyncio.create_subprocess_exec(*cmd, cwd=container.get("workingDir"), env=env,
                                                        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        self.procs[meta["uid"]] = proc
        if meta["uid"] in self.deleting:  # deleted while it was starting
            return await self.reap(meta["uid"])
        started = now()
        ready = [{"type": t, "status": "True"} for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
        await self.status(ns, name, {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
                                     "startTime": started, "conditions": ready, "containerStatuses": [{
                                         "name": cname, "ready": True, "started": True, "restartCount": 0,
                                         "image": container["image"], "imageID": container["image"],
                                         "containerID": f"agent://{proc.pid}",
                                         "state": {"running": {"startedAt": started}}}]})
        code = await proc.wait()
        if meta["uid"] in self.deleting:
            return  # deleted: the Pod goes away, no status to report
        exit_code = 128 - code if code < 0 else code  # a signal shows as 128 + its number
        term = {"exitCode": exit_code, "reason": "Completed" if code == 0 else "Error", "startedAt": started,
                "finishedAt": now(), "containerID": f"agent://{proc.pid}"}
        await self.status(ns, name, {"phase": "Succeeded" if code == 0 else "Failed", "conditions": [
            {"type": "Ready", "status": "False", "reason": "PodCompleted"}], "containerStatuses": [{
                "name": cname, "ready": False, "started": False, "restartCount": 0, "image": container["image"],
                "imageID": container["image"], "state": {"terminated": term}}]})

    async def environment(self, pod: dict[str, Any], container: dict[str, Any], ip: str) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]

        async def lookup(kind: Any, ref: dict[str, Any]) -> dict[str, str]:
            try:
                obj = (await self.api.get(kind, ref["name"], namespace=ns)).to_dict()
            except ApiError as exc:
                raise LookupError(f'{kind.__name__.lower()} "{ref["name"]}" not found') from exc
            if kind is Secret:
                return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            return dict(obj.get("data") or {})

        fields = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": ns, "status.podIP": ip,
                  "spec.nodeName": self.node, "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "")}
        env = {"PATH": os.environ["PATH"], "HOME": "/root", "HOSTNAME": pod["metadata"]["name"]}
        for source in container.get("envFrom") or ():
            kind, ref = (Secret, source["secretRef"]) if "secretRef" in source else (ConfigMap, source["configMapRef"])
            env.update({source.get("prefix", "") + k: v for k, v in (await lookup(kind, ref)).items()})
        for var in container.get("env") or ():
            value_from = var.get("valueFrom") or {}
            if "secretKeyRef" in value_from or "configMapKeyRef" in value_from:
                kind, ref = (Secret, value_from["secretKeyRef"]) if "secretKeyRef" in value_from else (
                    ConfigMap, value_from["configMapKeyRef"])
                data = await lookup(kind, ref)
                if ref["key"] not in data:
                    raise LookupError(f'couldn\'t find key {ref["key"]} in {kind.__name__} {ns}/{ref["name"]}')
                env[var["name"]] = data[ref["key"]]
            elif "fieldRef" in value_from:
                env[var["name"]] = fields[value_from["fieldRef"]["fieldPath"]]
            else:
                env[var["name"]] = var.get("value", "")
        return env

    async def terminate(self, uid: str, ns: str, name: str, grace: int) -> None:
        proc = self.procs.get(uid)
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                proc.kill()
        await self.reap(uid)
        try:  # the node confirms the containers are gone: the API server removes the Pod
            await self.api.delete(Pod, name, namespace=ns, grace_period=0)
        except ApiError as exc:
            if exc.status.code != 404:
                raise

    async def reap(self, uid: str) -> None:
        self.deleting.add(uid)
        proc = self.procs.pop(uid, None)
        if proc is not None:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    async def reap_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for uid in list(self.procs):
            await self.reap(uid)
