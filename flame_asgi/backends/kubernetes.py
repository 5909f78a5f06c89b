"""KubernetesBackend: each runner is a Pod cloned from the parent's own Pod.

The parent reads its own Pod (found by ``POD_NAME``/``POD_NAMESPACE`` from the downward
API, else by host name) and creates, per runner, a Pod with the same image, service
account, resources, environment and configuration volumes, running the app under
uvicorn in runner mode. ``FLAME_PARENT`` and the channel key travel in a Secret created
for that runner and referenced with ``secretKeyRef``, so they never appear in the Pod's
spec. Ownership makes Kubernetes clean up after a parent Pod that goes away: both the
runner Pod and its Secret are owned by the parent Pod. The parent waits for the Pod's IP
within ``boot_timeout`` (saying why when it does not come: unschedulable, image pull,
a crash) and dials ``http://<pod IP>:<port>``. With ``host_network=True`` a runner Pod uses
its node's network instead: it binds the node's address (``status.podIP``, through the
downward API) on a port picked for it, declared as a host port so the scheduler never puts
two runners on one port of one node. Stopping a runner deletes its Pod (with a
grace period) and its Secret, and waits until the Pod is gone.

The API is spoken with lightkube (async, httpx-based), an optional dependency; its errors
become ``BootError`` naming the verb and resource a refused request needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import math
import os
import random
import secrets
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flame_asgi._base.exceptions import BootError
from flame_asgi._base.parent import runner_mode
from flame_asgi._base.settings import setting, setting_value
from flame_asgi._wire.channel import Channel
from flame_asgi._wire.exits import ExitReason
from flame_asgi.backends import _kubernetes_pods as pods
from flame_asgi.backends._base import Backend, RunnerHandle, RunnerSpec
from flame_asgi.backends._kubernetes_api import _delete_now, aiter_api, api_error
from flame_asgi.backends._kubernetes_pods import LABEL_PARENT, label, load_template, runner_name
from flame_asgi.backends._toolkit import (
    connect_when_up,
    forget_sweep,
    forwarded_env,
    same_python,
    sweep_at_exit,
    uvicorn_command,
)

if TYPE_CHECKING:
    from lightkube import AsyncClient, KubeConfig

log = logging.getLogger("flame_asgi.backends.kubernetes")
INSTALL_HINT = "KubernetesBackend needs lightkube: pip install 'flame_asgi[kubernetes]'"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubernetesBackend(Backend):
    """Boot each runner as a Pod cloned from the parent's Pod, through the Kubernetes API.

    - ``parent_pod``, ``namespace``: the Pod to clone and own runners by (default
      ``POD_NAME``/``POD_NAMESPACE``, else the host name and the service account's namespace).
    - ``container``: which of the parent Pod's containers to copy (default: the first).
    - ``image``: run runners from another image (default: the parent container's).
    - ``app``: import string of the app (found from the pool's app when omitted).
    - ``python``, ``command``: the interpreter of the default command
      ``python -m uvicorn <app> --host 0.0.0.0 --port <port>``, or a whole other command.
    - ``cpu``, ``memory``: requests and limits of the runner container ("500m", "1Gi").
    - ``env``: extra variables (added to those the parent container's spec defines).
    - ``template``: a Pod manifest (dict, lightkube ``Pod`` or YAML/JSON file path) merged
      over the generated Pod: mappings merge, lists replace, ``None`` removes; its first
      container merges into the runner container, further containers are added.
    - ``port``: where runners listen on their Pod IP. ``host_network=True``: runner Pods run on
      their node's network (``hostNetwork``), each bound to the node's address on a port of its
      own drawn from ``host_ports`` (which ``port`` then does not set).
    - ``kubeconfig``: a kubeconfig path or lightkube ``KubeConfig`` (default: in-cluster,
      else ``KUBECONFIG`` or ``~/.kube/config``); ``context``: a context of it.
    """

    name = "kubernetes"

    def __init__(
        self,
        *,
        app: str | None = None,
        parent_pod: str | None = None,
        namespace: str | None = None,
        container: str | None = None,
        image: str | None = None,
        python: str | None = None,
        command: Sequence[str] | None = None,
        cpu: str | None = None,
        memory: str | None = None,
        env: Mapping[str, str] | None = None,
        template: Mapping[str, Any] | str | Path | Any = None,
        port: int = 8000,
        host_network: bool = False,
        host_ports: range = range(20000, 30000),
        kubeconfig: str | Path | KubeConfig | None = None,
        context: str | None = None,
        log_level: str = "warning",
        stop_timeout: float = 5.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
    ) -> None:
        if importlib.util.find_spec("lightkube") is None:
            raise ImportError(INSTALL_HINT)
        if not 0 < port < 65536:
            raise ValueError(f"KubernetesBackend: port must be between 1 and 65535 (got {port})")
        if host_network and not (len(host_ports) and 0 < host_ports[0] and host_ports[-1] < 65536):
            raise ValueError(f"KubernetesBackend: host_ports must be a non-empty range of ports (got {host_ports})")
        self._app = app
        self.parent_pod = parent_pod or os.environ.get("POD_NAME") or socket.gethostname()
        self._namespace = namespace or os.environ.get("POD_NAMESPACE") or None
        self.container = container
        self.image = image
        self.python = python
        self.command = list(command) if command is not None else None
        self.cpu, self.memory = cpu, memory
        self.env = dict(env or {})
        self.template = load_template(template)
        self.port = port
        self.host_network = host_network
        self.host_ports = host_ports
        self.kubeconfig = kubeconfig
        self.context = context
        self.log_level = log_level
        self.stop_timeout = stop_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.id = secrets.token_hex(4)  # labels this backend's Pods and Secrets
        self._config: Any = None
        self._client: AsyncClient | None = None
        self._parent: dict[str, Any] | None = None
        self._owned: set[str] = set()  # runner Pods (and their Secrets) not yet deleted
        self._lock = asyncio.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KubernetesBackend:
        """The backend ``FLAME_BACKEND=kubernetes`` builds, from ``FLAME_K8S_*`` variables."""
        def get(key: str) -> str | None:
            return setting(f"FLAME_K8S_{key}", environ) or None

        return cls(app=get("APP"), parent_pod=get("PARENT_POD"), namespace=get("NAMESPACE"),
                   container=get("CONTAINER"), image=get("IMAGE"), python=get("PYTHON"), cpu=get("CPU"),
                   memory=get("MEMORY"), template=get("TEMPLATE"), port=int(get("PORT") or 8000),
                   host_network=setting_value("FLAME_K8S_HOST_NETWORK", environ) == "1",
                   kubeconfig=get("KUBECONFIG"), context=get("CONTEXT"))

    def bind(self, pool: str, app: Any | None) -> None:
        super().bind(pool, app)
        if not runner_mode():  # a runner's own pools never boot: they need no configuration
            self._load_config()

    async def start(self) -> None:
        # Read the parent Pod now: the first boot saves a round trip, and a misconfiguration
        # shows in the log at startup. Not fatal: the app may serve without its runners.
        if runner_mode() or self._parent is not None:
            return
        try:
            await asyncio.wait_for(self.parent(), 5.0)
        except (BootError, TimeoutError) as exc:
            log.warning("KubernetesBackend: runners will not boot until this is fixed: %s", exc or "API timeout")

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            try:
                self._namespace = (SA_DIR / "namespace").read_text().strip()
            except OSError:
                self._namespace = self._load_config().namespace or "default"
        return self._namespace

    # -- the API ------------------------------------------------------------------------
    def _load_config(self) -> Any:
        if self._config is None:
            from lightkube import ConfigError, KubeConfig

            try:
                if self.kubeconfig is None:
                    config = KubeConfig.from_env()
                elif isinstance(self.kubeconfig, (str, Path)):
                    config = KubeConfig.from_file(self.kubeconfig)
                else:
                    config = self.kubeconfig
                self._config = config.get(self.context) if isinstance(config, KubeConfig) else config
            except (ConfigError, KeyError, OSError, ValueError) as exc:
                raise BootError(f"KubernetesBackend found no usable Kubernetes configuration ({exc}): run the parent "
                                "in a Pod with a service account, or set KUBECONFIG / kubeconfig=",
                                reason="no kubernetes config") from None
        return self._config

    async def api(self) -> AsyncClient:
        async with self._lock:
            if self._client is None:
                from lightkube import AsyncClient

                self._client = AsyncClient(self._load_config(), namespace=self.namespace,
                                           field_manager="flame_asgi")
                sweep_at_exit(f"kubernetes-{self.id}", functools.partial(
                    _delete_now, self._config, self.namespace, self._owned))
            return self._client

    async def call(self, verb: str, resource: str, request: Any) -> Any:
        """Await one API request; failures become a BootError naming ``verb`` on ``resource``."""
        try:
            return await request
        except Exception as exc:
            raise api_error(exc, verb, resource, self.namespace, self._server()) from None

    def _server(self) -> str:
        return str(getattr(getattr(self._config, "cluster", None), "server", "?"))

    async def parent(self) -> dict[str, Any]:
        """The parent Pod (read once): what runners are cloned from and owned by."""
        if self._parent is None:
            from lightkube import ApiError
            from lightkube.resources.core_v1 import Pod

            api = await self.api()
            try:
                pod = await api.get(Pod, self.parent_pod, namespace=self.namespace)
            except ApiError as exc:
                if exc.status.code != 404:
                    raise api_error(exc, "get", "pods", self.namespace, self._server()) from None
                raise BootError(f"KubernetesBackend: the parent pod {self.namespace}/{self.parent_pod} does not exist. "
                                "Runners are cloned from the Pod this process runs in: give it POD_NAME and "
                                "POD_NAMESPACE through the downward API, or pass parent_pod= and namespace=",
                                reason="parent pod not found") from None
            except Exception as exc:
                raise api_error(exc, "get", "pods", self.namespace, self._server()) from None
            self._parent = pod.to_dict()
            await self._sweep_finished(api, self._parent)
        return self._parent

    async def _sweep_finished(self, api: AsyncClient, parent: dict[str, Any]) -> None:
        # Runners of an earlier process in this same Pod (a restarted container) exited by
        # themselves when it died; their Pods and Secrets stay until the parent Pod goes.
        from lightkube.resources.core_v1 import Pod, Secret

        uid = parent["metadata"]["uid"]
        with contextlib.suppress(Exception):
            async for found in api.list(Pod, namespace=self.namespace, labels={LABEL_PARENT: label(self.parent_pod)}):
                pod = found.to_dict()
                owners = pod["metadata"].get("ownerReferences") or ()
                if pods.pod_ended(pod) and any(o.get("uid") == uid for o in owners):
                    for kind in (Pod, Secret):  # a runner's Secret has its Pod's name
                        with contextlib.suppress(Exception):
                            await api.delete(kind, pod["metadata"]["name"], namespace=self.namespace)

    # -- boot -------------------------------------------------------------------------------
    async def boot(self, spec: RunnerSpec) -> KubernetesRunnerHandle:
        from lightkube.resources.core_v1 import Pod, Secret

        loop = asyncio.get_running_loop()
        # Our own deadline falls a little before the pool's, so a late boot says why it is late.
        budget = spec.boot_timeout
        deadline = None if budget is None else loop.time() + budget - min(1.0, budget / 10)
        api = await self.api()
        parent = await self.parent()
        # On the node's network each runner needs a port of its own; a clash with a port in
        # use fails that boot at once (the scheduler's or the bind's), and the pool boots again.
        port = random.choice(self.host_ports) if self.host_network else self.port
        handle = KubernetesRunnerHandle(self, spec, runner_name(spec.runner_id), deadline, port)
        self._owned.add(handle.name)
        try:
            await self.call("create", "secrets", api.create(Secret.from_dict(self.secret_manifest(spec, parent))))
            handle.secret_created = True
            manifest = self.pod_manifest(spec, parent, port)
            pod = await self.call("create", "pods", api.create(Pod.from_dict(manifest)))
            handle.created = pod.to_dict()
            await handle.wait_for_ip()
        except BaseException:
            await asyncio.shield(handle.stop(0))
            raise
        return handle

    def pod_manifest(self, spec: RunnerSpec, parent: Mapping[str, Any], port: int | None = None) -> dict[str, Any]:
        """The runner Pod for ``spec`` listening on ``port``: the parent's Pod made a runner,
        then ``template`` over it."""
        port = self.port if port is None else port
        source = pods.source_container(parent.get("spec") or {}, self.container)
        if source is None:
            names = ", ".join(c.get("name", "?") for c in (parent.get("spec") or {}).get("containers") or ())
            raise BootError(f"KubernetesBackend: the parent pod {self.parent_pod} has no container "
                            f"{self.container!r} (it has: {names or 'none'})", reason="no such container")
        python = self.python or same_python(self.image, source.get("image"))
        # On the node's network, bind the node's address rather than all of the node's
        # interfaces: the kubelet expands $(FLAME_POD_IP) from the downward API.
        host = f"$({pods.POD_IP})" if self.host_network else "0.0.0.0"
        command = self.command or uvicorn_command(
            python, self.runner_app(), host=host, port=port, log_level=self.log_level,
            max_payload=spec.info.max_payload, stop_timeout=self.stop_timeout)
        return pods.pod_manifest(
            spec, parent, source, namespace=self.namespace, labels=self.labels(spec), command=command,
            env={**forwarded_env(), "PYTHONUNBUFFERED": "1", **self.env}, port=port, image=self.image,
            cpu=self.cpu, memory=self.memory, stop_timeout=self.stop_timeout, template=self.template,
            host_network=self.host_network)

    def secret_manifest(self, spec: RunnerSpec, parent: Mapping[str, Any]) -> dict[str, Any]:
        return pods.secret_manifest(spec, parent, self.namespace, self.labels(spec))

    def labels(self, spec: RunnerSpec) -> dict[str, str]:
        return pods.labels(spec, self.parent_pod, self.id)

    # -- cleanup ----------------------------------------------------------------------------
    async def aclose(self) -> None:
        client, self._client = self._client, None
        forget_sweep(f"kubernetes-{self.id}")
        if client is None:
            return
        from lightkube.resources.core_v1 import Pod, Secret

        # Leftovers: runners the pool never got to stop (a boot cancelled half-way...). By
        # name, not by listing: listing Secrets would mean reading every Secret around.
        try:
            for name in list(self._owned):
                for kind in (Pod, Secret):
                    with contextlib.suppress(Exception):
                        await client.delete(kind, name, namespace=self.namespace, grace_period=0)
        finally:
            self._owned.clear()
            await client.close()

    def __repr__(self) -> str:
        return (f"KubernetesBackend(parent_pod={self.parent_pod!r}, namespace={self._namespace!r}, "
                f"image={self.image!r}, app={self.runner_app()!r})")


class KubernetesRunnerHandle(RunnerHandle):
    def __init__(self, backend: KubernetesBackend, spec: RunnerSpec, name: str, deadline: float | None,
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
        server = self.backend._server()
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
        # The channel often drops before the node has reported the exit: look again for a
        # second (the pool gives us 1.5 s).
        give_up = asyncio.get_running_loop().time() + 1.0
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
            self.backend._owned.discard(self.name)
