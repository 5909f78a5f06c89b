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
from flame_asgi.backends import _kubernetes_pods as pods
from flame_asgi.backends._base import Backend, RunnerSpec
from flame_asgi.backends._kubernetes_api import _delete_now, api_error
from flame_asgi.backends._kubernetes_handle import KubernetesRunnerHandle
from flame_asgi.backends._kubernetes_pods import LABEL_PARENT, label, load_template, runner_name
from flame_asgi.backends._toolkit import (
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
      ``python -m flame_asgi.backends._serve <app> --host 0.0.0.0 --port <port>`` (uvicorn),
      or a whole other command.
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
        heartbeat_interval: float = 2.5,
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
        # The kubelet relists its containers every second and then patches the Pod's
        # status: under load an OOM kill or crash reaches the API a few seconds after the
        # channel drops, and the call should fail with that reason, not "unreachable".
        self.describe_loss_timeout = 5.0
        self.id = secrets.token_hex(4)  # labels this backend's Pods and Secrets
        self._config: Any = None
        self._client: AsyncClient | None = None
        self._parent: dict[str, Any] | None = None
        self._owned: set[str] = set()  # runner Pods (and their Secrets) not yet deleted
        self._resweep: asyncio.Task[None] | None = None
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
            raise api_error(exc, verb, resource, self.namespace, self.server()) from None

    def server(self) -> str:
        """The API server's address, for error messages."""
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
                    raise api_error(exc, "get", "pods", self.namespace, self.server()) from None
                raise BootError(f"KubernetesBackend: the parent pod {self.namespace}/{self.parent_pod} does not exist. "
                                "Runners are cloned from the Pod this process runs in: give it POD_NAME and "
                                "POD_NAMESPACE through the downward API, or pass parent_pod= and namespace=",
                                reason="parent pod not found") from None
            except Exception as exc:
                raise api_error(exc, "get", "pods", self.namespace, self.server()) from None
            self._parent = pod.to_dict()
            await self._sweep_finished(api, self._parent)
            # The kubelet restarts a killed container within a second or two, often before
            # the dead process's runners have noticed and exited: look again once they have.
            self._resweep = asyncio.get_running_loop().create_task(self._sweep_later(self._parent))
        return self._parent

    async def _sweep_later(self, parent: dict[str, Any]) -> None:
        await asyncio.sleep(self.heartbeat_timeout + self.stop_timeout + 5.0)
        if self._client is not None:
            await self._sweep_finished(self._client, parent)

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
        if self._resweep is not None:
            self._resweep.cancel()
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

    def forget(self, name: str) -> None:
        """A runner's Pod is gone: the last-resort sweeps need not delete it."""
        self._owned.discard(name)

    def __repr__(self) -> str:
        return (f"KubernetesBackend(parent_pod={self.parent_pod!r}, namespace={self._namespace!r}, "
                f"image={self.image!r}, app={self.runner_app()!r})")
