"""DockerBackend: each runner is a container of the app's image, through the Engine API.

The parent asks the Docker Engine (``aiodocker``, async) for one container per runner:
the parent's own image unless ``image=`` names another, the same app under uvicorn with
``FLAME_PARENT`` and the channel key in its environment, CPU/memory limits, and its port
published on 127.0.0.1 only. Containers are labelled with the parent's id and the pool,
created with ``AutoRemove`` (``docker run --rm``), and removed when the backend closes
or, failing that, when the parent process exits; a runner whose parent dies outright
exits by itself (heartbeat watchdog), and AutoRemove then deletes its container.

With ``standby=N`` the backend keeps ``N`` containers created ahead for the pool's next
runners (``docker create``, not started: no CPU, no memory), so a boot is only a start.
They are removed with the backend; ones a killed parent left behind are removed by the
next DockerBackend on the same Engine once it sees their parent is gone.

The Engine's event stream tells how a container ended (exit code, OOM kill), which the
container's inspect data cannot after AutoRemove has deleted it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import importlib.util
import logging
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flame_asgi._base.exceptions import BootError
from flame_asgi._base.settings import setting
from flame_asgi._observe.runner_logs import RunnerOutput
from flame_asgi._wire.channel import Channel
from flame_asgi._wire.exits import ExitReason
from flame_asgi.backends._base import Backend, RunnerHandle, RunnerSpec
from flame_asgi.backends._docker_config import (
    LABEL_BACKEND,
    LABEL_PARENT,
    LABEL_PARENT_CONTAINER,
    LABEL_POOL,
    LABEL_RUNNER,
    container_config,
    container_id_in,
    container_name,
    describe_exit,
    engine_error,
    own_container_id,
    parent_id,
    parse_memory,
    published_url,
)
from flame_asgi.backends._docker_sweep import remove_labelled, remove_orphans
from flame_asgi.backends._toolkit import (
    connect_when_up,
    forwarded_env,
    free_port,
    sweep_at_exit,
    uvicorn_command,
)

if TYPE_CHECKING:
    import aiodocker
    from aiodocker.containers import DockerContainer

__all__ = ["LABEL_BACKEND", "LABEL_PARENT", "DockerBackend", "container_id_in", "parent_id"]
log = logging.getLogger("flame_asgi.backends.docker")
INSTALL_HINT = "DockerBackend needs aiodocker: pip install 'flame_asgi[docker]'"


class DockerBackend(Backend):
    """Boot each runner as a Docker container serving the same app in runner mode.

    - ``image``: image to run; ``None`` means the image of the container this process runs in.
    - ``app``: import string of the app (found from the pool's app when omitted).
    - ``command``: the container's command; by default
      ``python -m flame_asgi.backends._serve <app> --host 0.0.0.0 --port <port>`` (uvicorn,
      quiet while idle; ``python`` = ``python=``).
    - ``cpus`` (e.g. ``1.5``), ``memory`` (bytes or ``"512m"``; no swap beyond it).
    - ``env``: extra variables (the parent's environment is *not* copied).
    - ``network``: Docker network (``"host"`` shares the host's; the port is then picked free).
    - ``binds``: ``"host:container[:ro]"`` bind mounts; ``working_dir``; ``labels``.
    - ``host_ip``: where the port is published (loopback by default); ``None`` dials the
      container's own address on ``network``, for a parent that runs on that network.
    - ``host_config``: raw Engine ``HostConfig`` fields merged last (devices, shm, GPUs...).
    - ``docker_url``: the Engine (default ``DOCKER_HOST``, else the local socket).
    - ``standby``: containers kept created (not started) for the next boots: a boot is then a
      start (``docker start`` instead of ``docker run``).
    """

    name = "docker"

    def __init__(
        self,
        image: str | None = None,
        *,
        app: str | None = None,
        command: Sequence[str] | None = None,
        python: str = "python",
        cpus: float | None = None,
        memory: int | str | None = None,
        env: Mapping[str, str] | None = None,
        network: str | None = None,
        binds: Sequence[str] = (),
        working_dir: str | None = None,
        labels: Mapping[str, str] | None = None,
        host_ip: str | None = "127.0.0.1",
        port: int = 8000,
        init: bool = True,
        host_config: Mapping[str, Any] | None = None,
        docker_url: str | None = None,
        log_level: str = "warning",
        stop_timeout: float = 5.0,
        heartbeat_interval: float = 2.5,
        heartbeat_timeout: float = 10.0,
        standby: int = 0,
    ) -> None:
        if importlib.util.find_spec("aiodocker") is None:
            raise ImportError(INSTALL_HINT)
        if standby < 0:
            raise ValueError(f"DockerBackend: standby must be >= 0 (got {standby})")
        self.standby = standby
        self.image = image
        self._app = app
        self.command = list(command) if command is not None else None
        self.python = python
        self.cpus = cpus
        self.memory = parse_memory(memory)
        self.env = dict(env or {})
        self.network = network
        self.binds = list(binds)
        self.working_dir = working_dir
        self.labels = dict(labels or {})
        self.host_ip = host_ip
        self.port = port
        self.init = init
        self.host_config = dict(host_config or {})
        self.docker_url = docker_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self.log_level = log_level
        self.stop_timeout = stop_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.id = secrets.token_hex(4)  # this backend's containers, among the process's
        self._docker: aiodocker.Docker | None = None
        self._lock = asyncio.Lock()
        self._exits: dict[str, _Exit] = {}
        self._events: asyncio.Task[None] | None = None
        self._prepared: dict[str, tuple[DockerContainer, int]] = {}  # runner id -> created container, port
        self._sweep: asyncio.Task[int] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DockerBackend:
        """The backend ``FLAME_BACKEND=docker`` builds, from ``FLAME_DOCKER_*`` variables."""
        def get(key: str) -> str | None:
            return setting(f"FLAME_DOCKER_{key}", environ) or None

        host_ip = get("HOST_IP") or "127.0.0.1"
        return cls(
            get("IMAGE"), app=get("APP"), python=get("PYTHON") or "python",
            cpus=float(get("CPUS") or 0) or None, memory=get("MEMORY"), network=get("NETWORK"),
            binds=[b.strip() for b in (get("BINDS") or "").split(",") if b.strip()],
            working_dir=get("WORKDIR"), host_ip=None if host_ip.lower() == "none" else host_ip,
            standby=int(get("STANDBY") or 0),
        )

    # -- the Engine -----------------------------------------------------------------------
    async def _client(self) -> aiodocker.Docker:
        async with self._lock:
            if self._docker is None:
                import aiodocker

                docker = aiodocker.Docker(url=self.docker_url)
                try:
                    await docker.version()
                except Exception as exc:
                    await docker.close()
                    raise engine_error(f"cannot reach the Docker Engine at {self.docker_url}", exc) from None
                self._docker = docker
                self._events = asyncio.get_running_loop().create_task(self._watch(docker))
                self._sweep = asyncio.get_running_loop().create_task(remove_orphans(docker, parent_id()))
                label = f"{LABEL_PARENT}={parent_id()}"
                sweep_at_exit(f"docker-{self.docker_url}-{label}", functools.partial(remove_labelled, self.docker_url,
                                                                                     label))
                # Wait (briefly) until the event stream is open: a runner that dies during
                # boot must not do so before anyone listens for its exit code.
                for _ in range(100):
                    if docker.events.json_stream is not None or self._events.done():
                        break
                    await asyncio.sleep(0.01)
            return self._docker

    async def _watch(self, docker: aiodocker.Docker) -> None:
        filters = {"type": ["container"], "event": ["die", "oom"], "label": [f"{LABEL_PARENT}={parent_id()}"]}
        events = docker.events.subscribe(filters=filters)  # type: ignore[no-untyped-call]
        while (event := await events.get()) is not None:
            actor = event.get("Actor") or {}
            record = self._exits.get(actor.get("ID") or event.get("id", ""))
            if record is None:
                continue
            if event.get("Action") == "oom":
                record.oom = True
            elif event.get("Action") == "die":
                record.code = int((actor.get("Attributes") or {}).get("exitCode", -1))
                record.event.set()

    async def _own_image(self, docker: aiodocker.Docker) -> str:
        cid = own_container_id()
        if cid is None:
            raise BootError("DockerBackend(image=None) runs runners from this process's own image, but this "
                            "process does not run in a Docker container: pass image=...", reason="no image")
        try:
            info = await docker.containers.container(cid).show()
        except Exception as exc:
            raise engine_error(f"cannot inspect this process's own container {cid[:12]}", exc) from None
        return str(info["Image"])

    # -- boot -----------------------------------------------------------------------------
    async def prepare(self, spec: RunnerSpec) -> None:
        """Create ``spec``'s container without starting it: its boot is then a start."""
        self._prepared[spec.runner_id] = await self._create(await self._client(), spec)

    async def boot(self, spec: RunnerSpec) -> DockerRunnerHandle:
        docker = await self._client()
        prepared = self._prepared.pop(spec.runner_id, None)
        container, port = prepared if prepared is not None else await self._create(docker, spec)
        handle = DockerRunnerHandle(self, container, spec)
        try:
            await container.start()
            handle.started = True
            handle.follow_logs()
            handle.url = await self._address(handle, port, self.network == "host")
        except BaseException as exc:
            await asyncio.shield(handle.stop(0))
            if isinstance(exc, BootError) or not isinstance(exc, Exception):
                raise
            raise engine_error(f"cannot start runner container {handle.name}", exc) from None
        return handle

    async def _create(self, docker: aiodocker.Docker, spec: RunnerSpec) -> tuple[DockerContainer, int]:
        image = self.image or await self._own_image(docker)
        host_mode = self.network == "host"
        port = free_port() if host_mode else self.port
        command = self.command or uvicorn_command(
            self.python, self.runner_app(), host="127.0.0.1" if host_mode else "0.0.0.0", port=port,
            log_level=self.log_level, max_payload=spec.info.max_payload, stop_timeout=self.stop_timeout)
        config = container_config(
            image=image, command=command, env={"PYTHONUNBUFFERED": "1", **forwarded_env(), **self.env, **spec.env},
            port=port, labels={**self.labels, LABEL_PARENT: parent_id(), LABEL_POOL: spec.pool,
                               LABEL_PARENT_CONTAINER: own_container_id() or "", LABEL_RUNNER: spec.runner_id,
                               LABEL_BACKEND: self.id},
            network=self.network, host_ip=self.host_ip, binds=self.binds, init=self.init, cpus=self.cpus,
            memory=self.memory, working_dir=self.working_dir, host_config=self.host_config)
        try:
            container = await docker.containers.create(config, name=container_name(spec.runner_id))
        except Exception as exc:
            raise engine_error(f"cannot create a runner container from image {image!r}", exc) from None
        return container, port

    async def _address(self, handle: DockerRunnerHandle, port: int, host_mode: bool) -> str:
        if host_mode:
            return f"http://127.0.0.1:{port}"
        try:
            settings = (await handle.container.show())["NetworkSettings"]
        except Exception as exc:
            raise await handle.boot_failure(f"cannot inspect runner container {handle.name}", exc) from None
        url = published_url(settings, port, host_ip=self.host_ip, network=self.network)
        if url is None:
            raise await handle.boot_failure(f"runner container {handle.name} has no address for port {port}", None)
        return url

    # -- cleanup --------------------------------------------------------------------------
    async def aclose(self) -> None:
        docker, self._docker = self._docker, None
        self._prepared.clear()  # removed below with the other leftovers
        if docker is None:
            return
        if self._sweep is not None:
            self._sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweep
        try:
            # Leftovers: runners the pool never got to stop (a boot cancelled half-way...).
            leftovers = await docker.containers.list(all=True, filters={"label": [f"{LABEL_BACKEND}={self.id}"]})
            for container in leftovers:
                with contextlib.suppress(Exception):
                    await container.delete(force=True)
        except Exception as exc:
            log.warning("DockerBackend: could not list leftover runner containers: %s", exc)
        finally:
            if self._events is not None:
                self._events.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._events
            with contextlib.suppress(Exception):
                await docker.events.stop()  # type: ignore[no-untyped-call]
            await docker.close()

    def __repr__(self) -> str:
        return f"DockerBackend(image={self.image!r}, app={self.runner_app()!r}, docker_url={self.docker_url!r})"


@dataclasses.dataclass
class _Exit:
    """How a container ended, filled in from the Engine's event stream."""

    event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    code: int | None = None
    oom: bool = False


class DockerRunnerHandle(RunnerHandle):
    def __init__(self, backend: DockerBackend, container: DockerContainer, spec: RunnerSpec) -> None:
        self.backend = backend
        self.container = container
        self.spec = spec
        self.name = container_name(spec.runner_id)
        self.exit = backend._exits.setdefault(container.id, _Exit())
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._logs: asyncio.Task[None] | None = None
        self.started = self._stopped = False

    def follow_logs(self) -> None:
        self._logs = asyncio.get_running_loop().create_task(self._pump_logs())

    async def _pump_logs(self) -> None:
        output = RunnerOutput(self.spec.pool, self.spec.runner_id)  # tagged, rate-limited (_runner_logs)
        with contextlib.suppress(Exception):  # the stream ends, or breaks, with the container
            async for chunk in self.container.log(stdout=True, stderr=True, follow=True):
                for line in chunk.rstrip("\n").splitlines():
                    self._tail.append(output.line(line))
        output.close()

    def output_tail(self, lines: int = 15) -> str:
        return "\n".join(list(self._tail)[-lines:]) or "(nothing)"

    async def connect(self, timeout: float | None) -> Channel:
        # docker-proxy accepts on the published port before the app listens, then drops the
        # connection: a failed attempt means "not yet", until the deadline or the container exits.
        assert self.url is not None

        async def ended() -> ExitReason | None:
            if not self.exit.event.is_set():
                return None
            await self._drain_logs()
            return self.describe()

        return await connect_when_up(self.url, timeout, self.spec, ended=ended, check_every=0.0,
                                     what=f"runner container {self.name}", output=self.output_tail)

    async def boot_failure(self, what: str, exc: Exception | None) -> BootError:
        """A BootError that says how the container ended, with its last output."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.exit.event.wait(), 2.0)
        await self._drain_logs()
        why = str(self.describe()) if self.exit.event.is_set() else (str(exc) if exc else "unknown")
        return BootError(f"{what} ({why}); its last output:\n{self.output_tail()}", reason=why)

    async def _drain_logs(self) -> None:
        if self._logs is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._logs), 0.5)  # the last lines

    def describe(self) -> ExitReason:
        return describe_exit(self.name, self.exit.code, oom=self.exit.oom, memory=self.backend.memory)

    async def exit_reason(self) -> ExitReason | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exit.event.wait(), 1.0)
        if not self.exit.event.is_set():  # no event (yet): ask the Engine, before AutoRemove does
            with contextlib.suppress(Exception):
                state = (await self.container.show())["State"]
                if state["Running"]:
                    return None  # lost for another reason: network, a hung app
                self.exit.code, self.exit.oom = state["ExitCode"], self.exit.oom or state["OOMKilled"]
                self.exit.event.set()
        return self.describe() if self.exit.event.is_set() else None

    async def stop(self, timeout: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            async with asyncio.timeout(timeout + 10.0):
                if not self.started:
                    raise TimeoutError  # created, never started: no AutoRemove, delete it below
                if not self.exit.event.is_set():
                    with contextlib.suppress(Exception):  # 304 stopped, 404 gone: both fine
                        await self.container.stop(t=max(0, math.ceil(timeout)))
                with contextlib.suppress(Exception):  # AutoRemove: gone when stop returns
                    await self.container.wait(condition="removed")
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self.container.delete(force=True)
        finally:
            self.backend._exits.pop(self.container.id, None)
            if self._logs is not None:
                self._logs.cancel()
