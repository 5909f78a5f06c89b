"""One runner Pod, seen from the parent: wait for its IP, dial it, say why it ended, delete it.

``kubernetes.py`` creates the Pod and its Secret and hands them over; the handle needs of
its backend only what ``PodOwner`` names, so it can be read (and tested) on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from flame_asgi._base.exceptions import BootError
from flame_asgi._wire.channel import Channel
from flame_asgi._wire.exits import ExitReason
from flame_asgi.backends import _kubernetes_pods as pods
from flame_asgi.backends._base import RunnerHandle, RunnerSpec
from flame_asgi.backends._kubernetes_api import aiter_api
from flame_asgi.backends._toolkit import connect_when_up

if TYPE_CHECKING:
    from lightkube import AsyncClient

log = logging.getLogger("flame_asgi.backends.kubernetes")


class PodOwner(Protocol):
    """What a runner Pod's handle uses of its backend."""

    @property
    def namespace(self) -> str: ...

    async def api(self) -> AsyncClient: ...

    async def call(self, verb: str, resource: str, request: Awaitable[Any]) -> Any: ...

    def server(self) -> str: ...

    def forget(self, name: str) -> None: ...


class KubernetesRunnerHandle(RunnerHandle):
    def __init__(self, backend: PodOwner, spec: RunnerSpec, name: str, deadline: float | None,
                 port: int) -> None:
        self.backend = backend
        self.spec = spec
        self.name = name
        self.deadline = deadline
        self.port = port
        self.created: dict[str, Any] | None = None
        self.secret_created = False
        self._stopped = False

    def _left(self, timeout: float | None = None) -> float | None:
        now = asyncio.get_running_loop().time()
        ends = [t for t in (self.deadline, None if timeout is None else now + timeout) if t is not None]
        return None if not ends else min(ends) - now

    async def wait_for_ip(self) -> None:
        """Watch the Pod until it runs with an IP; fail at once if it cannot, say why at the deadline."""
        from lightkube.resources.core_v1 import Pod

        assert self.created is not None
        api, why = await self.backend.api(), "not scheduled yet"
        server = self.backend.server()
        version = self.created["metadata"]["resourceVersion"]
        try:
            async with asyncio.timeout(self._left()):
                while True:
                    watch = api.watch(Pod, namespace=self.backend.namespace, fields={"metadata.name": self.name},
                                      resource_version=version)
                    async for event, obj in aiter_api(watch, self.backend.namespace, server, "watch", "pods"):
                        pod = obj.to_dict()
                        if event == "DELETED" or (pod.get("metadata") or {}).get("deletionTimestamp"):
                            raise BootError(f"runner pod {self.name} was deleted while it booted",
                                            reason="pod deleted")
                        ip, fatal, why = pods.pod_progress(pod)
                        if fatal:
                            raise BootError(f"runner pod {self.name} failed to start: {why}", reason=why)
                        if ip:
                            self.url = f"http://{ip}:{self.port}"
                            return
                        version = pod["metadata"].get("resourceVersion") or version
                    # The API server ends watches when it likes (its timeout, a restart):
                    # read the Pod once, then watch again from where it stands.
                    pod = await self.backend.call("get", "pods", self._get())
                    if pod is None:
                        raise BootError(f"runner pod {self.name} was deleted while it booted", reason="pod deleted")
                    version = pod["metadata"].get("resourceVersion") or version
                    await asyncio.sleep(0.1)
        except TimeoutError:
            pass
        # Only a deadline ends the loop, so boot_timeout is set (None never times out).
        budget = self.spec.boot_timeout
        raise BootError(f"runner pod {self.backend.namespace}/{self.name} got no IP within boot_timeout="
                        f"{budget if budget is None else format(budget, 'g')} s: {why}", reason=f"no pod IP: {why}")

    async def connect(self, timeout: float | None) -> Channel:
        # The Pod has an IP before its app listens: a refused connection means "not yet",
        # until the deadline or until the Pod shows its container has ended.
        assert self.url is not None

        async def ended() -> ExitReason | None:
            pod = await self.backend.call("get", "pods", self._get())
            return pods.describe_end(pod, self.name) if pod is None or pods.pod_ended(pod) else None

        return await connect_when_up(
            self.url, self._left(timeout), self.spec, ended=ended, what=f"runner pod {self.name}",
            hint=f"does its container serve the app on port {self.port}? see `kubectl logs -n "
                 f"{self.backend.namespace} {self.name}`")

    async def _get(self) -> dict[str, Any] | None:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod

        try:
            pod = await (await self.backend.api()).get(Pod, self.name, namespace=self.backend.namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        result: dict[str, Any] = pod.to_dict()
        return result

    async def exit_reason(self) -> ExitReason | None:
        if self._stopped:
            return None
        pod: dict[str, Any] | None = {}
        # The channel often drops before the node has reported the exit: look again for
        # 4.5 s (the backend's describe_loss_timeout is 5 s).
        give_up = asyncio.get_running_loop().time() + 4.5
        with contextlib.suppress(Exception):
            while True:
                pod = await self._get()
                if pod is None or pods.pod_ended(pod) or (pod.get("metadata") or {}).get("deletionTimestamp"):
                    return pods.describe_end(pod, self.name)
                if asyncio.get_running_loop().time() >= give_up:
                    break
                await asyncio.sleep(0.1)
        phase = ((pod or {}).get("status") or {}).get("phase", "unknown")
        return ExitReason("unreachable", f"runner pod {self.name} is still {phase}: its runner became unreachable")

    async def stop(self, timeout: float) -> None:
        """Delete the Pod (SIGTERM, SIGKILL after ``timeout``) and its Secret; wait until the Pod is gone."""
        if self._stopped:
            return
        self._stopped = True
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod, Secret

        api, ns, grace = await self.backend.api(), self.backend.namespace, max(0, math.ceil(timeout))

        async def delete(kind: Any, grace_period: int | None = None) -> None:
            try:
                await api.delete(kind, self.name, namespace=ns, grace_period=grace_period)
            except ApiError as exc:
                if exc.status.code != 404:
                    log.warning("KubernetesBackend: could not delete %s %s/%s: %s", kind.__name__, ns, self.name,
                                exc.status.message)
            except Exception as exc:
                log.warning("KubernetesBackend: could not delete %s %s/%s: %r", kind.__name__, ns, self.name, exc)

        await asyncio.gather(delete(Pod, grace), delete(Secret) if self.secret_created else asyncio.sleep(0))
        try:
            if self.created is None:
                return
            async with asyncio.timeout(grace + 10.0):
                delay = 0.05
                while await self._get() is not None:
                    await asyncio.sleep(delay)
                    delay = min(delay * 1.5, 0.2)
        except TimeoutError:  # the node did not confirm in time: remove the object anyway
            log.warning("KubernetesBackend: runner pod %s/%s outlived its grace period; force-deleting", ns, self.name)
            await delete(Pod, 0)
        except Exception as exc:
            log.warning("KubernetesBackend: could not confirm the deletion of pod %s/%s: %r", ns, self.name, exc)
        finally:
            self.backend.forget(self.name)
