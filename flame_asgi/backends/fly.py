"""FlyBackend: each runner is a Fly Machine booted from the parent's own image.

The backend speaks the Fly Machines API over httpx. It creates a machine from
``FLY_IMAGE_REF`` in the parent's region with ``auto_destroy`` and restart policy ``no``
(a runner that exits, or whose parent is gone, leaves no machine behind), waits for it to
start, and dials the runner on its private address (``http://[fdaa:...]:8080``) once
``/_flame/health`` answers. Creates are retried with backoff on 409, 412, 422 and 429
(capacity and rate limits); API and transport errors become ``BootError`` saying what to
fix. Stopping a runner stops its machine and destroys it; with ``standby=N`` a boot starts
a machine prepared ahead instead (``_fly_standby``), and ended runners' machines are kept
stopped for the next ones.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from flame_asgi._base.exceptions import BootError, FlyAPIError
from flame_asgi._base.parent import runner_mode
from flame_asgi._base.settings import setting
from flame_asgi._wire.channel import Channel
from flame_asgi._wire.exits import ExitReason
from flame_asgi.backends._base import Backend, RunnerHandle, RunnerSpec, connect_websocket
from flame_asgi.backends._fly_api import MachinesClient, describe_machine, env_int
from flame_asgi.backends._fly_standby import PARENT_KEY, RETRY_CREATE, MachineStandby
from flame_asgi.backends._toolkit import dns_name, forwarded_env, same_python, uvicorn_command

__all__ = ["FlyAPIError", "FlyBackend", "FlyRunnerHandle", "describe_machine"]
log = logging.getLogger("flame_asgi.backends.fly")
DEFAULT_API_URL = "https://api.machines.dev"
DOWN_STATES = frozenset({"stopping", "stopped", "suspending", "suspended", "destroying", "destroyed",
                         "failed", "launch_failed"})
HOST_FIELDS = ("id", "name", "private_ip", "region", "instance_id", "app")
RunnerHost = str | Callable[[Mapping[str, Any]], str]


class FlyBackend(Backend):
    """Boot each runner as a Fly Machine running the parent's image.

    Every option defaults from the environment Fly gives an app's machines:

    - ``token`` (``FLY_API_TOKEN``), ``fly_app`` (``FLY_APP_NAME``), ``image`` (``FLY_IMAGE_REF``):
      required (``app=`` for the Fly app name still works, deprecated: in every other
      backend ``app=`` is the import string, which here is ``app_import=``);
      ``region`` (``FLY_REGION``): where runners boot, the parent's region.
    - ``cpu_kind``, ``cpus``, ``memory_mb``, ``gpu_kind``, ``gpus``: the guest size
      (``FLAME_FLY_CPU_KIND`` ... ``FLAME_FLY_GPUS``; default a performance-1x, 2048 MB).
    - ``env``: extra variables for runners. Runners never inherit the parent's environment;
      they get ``FLAME_PARENT``, ``FLAME_RUNNER_KEYS``, ``FLAME_CODE_VERSION`` / ``FLAME_MAX_PAYLOAD``
      when the parent has them, ``env``, and what Fly sets itself (app secrets, ``FLY_*``).
    - ``port``: where the runner listens on its private address (8080).
    - ``cmd``: the runner's command line (``init.cmd``); default ``python -m
      flame_asgi.backends._serve <app> --host :: --port <port> ...`` (uvicorn). ``[]`` keeps
      the image's own CMD, which must then serve the app on ``[::]:port``.
    - ``runner_host``: how the parent reaches a machine (``FLAME_FLY_RUNNER_HOST``): a
      template over the machine's ``{id}``, ``{name}``, ``{private_ip}``, ``{region}``,
      ``{instance_id}``, ``{app}`` such as ``"{id}.vm.{app}.internal"``, or a callable taking
      the machine (the API's JSON) and returning a host. Default: its private IPv6 address.
    - ``api_url``: the Machines API (``FLAME_FLY_API_URL``, default https://api.machines.dev).
    - ``max_retries``: extra attempts of a create refused with 409/412/422/429.
    - ``standby`` (``FLAME_FLY_STANDBY``): machines kept ready for the next boots, which then
      start them instead of creating machines: created with ``skip_launch``, or stopped after
      a runner and updated for the next. Runner machines then have no ``auto_destroy``: the
      backend destroys them when it closes, and a later parent those a killed one left.
    """

    name = "fly"

    def __init__(
        self,
        *,
        app_import: str | None = None,
        token: str | None = None,
        fly_app: str | None = None,
        app: str | None = None,
        image: str | None = None,
        region: str | None = None,
        cpu_kind: str | None = None,
        cpus: int | None = None,
        memory_mb: int | None = None,
        gpu_kind: str | None = None,
        gpus: int | None = None,
        env: Mapping[str, str] | None = None,
        port: int = 8080,
        cmd: Sequence[str] | None = None,
        runner_host: RunnerHost | None = None,
        api_url: str | None = None,
        log_level: str = "warning",
        stop_timeout: float = 5.0,
        max_retries: int = 4,
        heartbeat_interval: float = 2.5,
        heartbeat_timeout: float = 10.0,
        standby: int | None = None,
    ) -> None:
        environ = os.environ
        if app is not None:
            warnings.warn("FlyBackend(app=...) names the Fly app: pass fly_app= instead (app= is the import string "
                          "in every other backend; here that is app_import=)", DeprecationWarning, stacklevel=2)
            fly_app = fly_app or app
        self._app = app_import
        self.token = token or environ.get("FLY_API_TOKEN", "")
        self.fly_app = fly_app or environ.get("FLY_APP_NAME", "")
        self.image = image or environ.get("FLY_IMAGE_REF", "")
        self.region = region or environ.get("FLY_REGION") or None
        self.cpu_kind = cpu_kind or setting("FLAME_FLY_CPU_KIND") or "performance"
        self.cpus = cpus if cpus is not None else env_int("FLAME_FLY_CPUS", 1)
        self.memory_mb = memory_mb if memory_mb is not None else env_int("FLAME_FLY_MEMORY_MB", 2048)
        self.gpu_kind = gpu_kind or setting("FLAME_FLY_GPU_KIND") or None
        self.gpus = gpus if gpus is not None else env_int("FLAME_FLY_GPUS", 1 if self.gpu_kind else 0)
        self.env = dict(env or {})
        self.port = port
        self.cmd = None if cmd is None else list(cmd)
        self.runner_host: RunnerHost = runner_host or setting("FLAME_FLY_RUNNER_HOST") or "{private_ip}"
        self.api_url = (api_url or setting("FLAME_FLY_API_URL") or DEFAULT_API_URL).rstrip("/")
        self.log_level = log_level
        self.stop_timeout = stop_timeout
        self.max_retries = max_retries
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.standby = standby if standby is not None else env_int("FLAME_FLY_STANDBY", 0)
        self.api = MachinesClient(self.api_url, self.token, self.fly_app, max_retries)
        self._machines = MachineStandby(self.api, self.standby)
        self._runner_client: httpx.AsyncClient | None = None
        if not 0 < port < 65536:
            raise ValueError(f"FlyBackend: port must be between 1 and 65535 (got {port})")
        if self.cpus < 1 or self.gpus < 0 or max_retries < 0 or self.standby < 0:
            raise ValueError(f"FlyBackend: cpus must be >= 1, gpus, max_retries and standby >= 0 (got cpus="
                             f"{self.cpus}, gpus={self.gpus}, max_retries={max_retries}, standby={self.standby})")
        if self.memory_mb < 256 or self.memory_mb % 256:
            raise ValueError(f"FlyBackend: memory_mb must be a multiple of 256 (got {self.memory_mb})")
        if isinstance(self.runner_host, str):
            try:
                self.runner_host.format(**dict.fromkeys(HOST_FIELDS, "x"))
            except (KeyError, IndexError) as exc:
                raise ValueError(f"FlyBackend: runner_host={self.runner_host!r} uses an unknown field {exc}; "
                                 f"known fields: {', '.join(HOST_FIELDS)}") from None

    # -- the Backend contract ---------------------------------------------------------
    def bind(self, pool: str, app: Any | None) -> None:
        super().bind(pool, app)
        if not runner_mode():  # a runner's own pools never boot; its machine may lack the token
            self.require_settings()

    def require_settings(self) -> None:
        """Raise ``BootError`` naming every missing required setting (token, app, image)."""
        missing = [(var, arg) for var, arg, value in (
            ("FLY_API_TOKEN", "token", self.token), ("FLY_APP_NAME", "fly_app", self.fly_app),
            ("FLY_IMAGE_REF", "image", self.image)) if not value]
        if not missing:
            return
        hints = []
        if not self.token:
            hints.append("create a token with `fly tokens create deploy` and `fly secrets set FLY_API_TOKEN=...`")
        if not (self.fly_app and self.image):
            hints.append("Fly sets FLY_APP_NAME and FLY_IMAGE_REF on the app's own machines")
        names = ", ".join(f"{var} (or {arg}=...)" for var, arg in missing)
        raise BootError(f"FlyBackend needs {names}: {'; '.join(hints)}",
                        reason=f"missing {', '.join(var for var, _ in missing)}")

    async def start(self) -> None:
        if self.standby and not runner_mode():
            try:  # machines of a killed parent: nothing else destroys them
                await self._machines.sweep(os.environ.get("FLY_MACHINE_ID"))
            except BootError as exc:
                log.warning("FlyBackend: could not look for machines left by a parent that is gone: %s", exc)

    async def prepare(self, spec: RunnerSpec) -> None:
        self.require_settings()
        await self._machines.prepare(spec.runner_id, self.machine_request(spec))

    async def boot(self, spec: RunnerSpec) -> FlyRunnerHandle:
        self.require_settings()
        machine = await self._machines.start(spec.runner_id) or await self.api.request(
            "POST", f"/v1/apps/{self.fly_app}/machines", json=self.machine_request(spec), retry_on=RETRY_CREATE)
        try:
            return FlyRunnerHandle(self, spec, machine)
        except BaseException:
            await asyncio.shield(self.api.destroy(machine.get("id", "")))
            raise

    def keep_stopped(self, machine_id: str) -> bool:
        """Keep an ended runner's stopped machine for a later runner (``standby``)? False:
        destroy it."""
        return bool(self.standby) and self._machines.keep(machine_id)

    async def aclose(self) -> None:
        await self._machines.aclose()
        await self.api.aclose()
        client, self._runner_client = self._runner_client, None
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        gpu = f", gpus={self.gpus}x{self.gpu_kind}" if self.gpu_kind else ""
        return (f"FlyBackend(fly_app={self.fly_app!r}, image={self.image!r}, region={self.region!r}, "
                f"guest={self.cpu_kind}-{self.cpus}x/{self.memory_mb}MB{gpu})")

    # -- what a machine is asked to be --------------------------------------------------
    def machine_request(self, spec: RunnerSpec) -> dict[str, Any]:
        """The body of the create request for ``spec``'s runner."""
        env = forwarded_env()
        env.update(self.env)
        env.update(spec.env)
        guest: dict[str, Any] = {"cpu_kind": self.cpu_kind, "cpus": self.cpus, "memory_mb": self.memory_mb}
        if self.gpu_kind:
            guest.update(gpu_kind=self.gpu_kind, gpus=self.gpus or 1)
        metadata = {"flame_pool": spec.pool, "flame_runner_id": spec.runner_id}
        if os.environ.get("FLY_MACHINE_ID"):
            metadata[PARENT_KEY] = os.environ["FLY_MACHINE_ID"]
        # With standby, machines outlive their runner (stopped, to be reused): the backend destroys them.
        config: dict[str, Any] = {"image": self.image, "env": env, "guest": guest, "auto_destroy": not self.standby,
                                  "restart": {"policy": "no"}, "metadata": metadata}
        cmd = self.command(spec)
        if cmd:
            config["init"] = {"cmd": cmd}
        body: dict[str, Any] = {"name": dns_name(spec.runner_id), "config": config}
        if self.region:
            body["region"] = self.region
        return body

    def command(self, spec: RunnerSpec) -> list[str]:
        if self.cmd is not None:
            return list(self.cmd)
        return uvicorn_command(same_python(self.image, os.environ.get("FLY_IMAGE_REF")), self.runner_app(), host="::",
                               port=self.port, log_level=self.log_level, max_payload=spec.info.max_payload,
                               stop_timeout=self.stop_timeout)

    def runner_url(self, machine: Mapping[str, Any]) -> str:
        """The base URL of the runner on ``machine`` (IPv6 literals bracketed)."""
        if callable(self.runner_host):
            host = self.runner_host(machine)
        else:
            fields = {key: machine.get(key) or "" for key in HOST_FIELDS}
            host = self.runner_host.format(**{**fields, "app": self.fly_app})
        if not host:
            raise BootError(f"Fly machine {machine.get('id')} has no address to reach it by (runner_host="
                            f"{self.runner_host!r}, private_ip={machine.get('private_ip')!r})", reason="no address")
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass  # a host name
        return f"http://{host}:{self.port}"

    # -- the API --------------------------------------------------------------------------
    def runner_client(self) -> httpx.AsyncClient:
        if self._runner_client is None:
            # No proxies from the environment: runners live on the private network.
            self._runner_client = httpx.AsyncClient(trust_env=False, timeout=2.0)
        return self._runner_client

class FlyRunnerHandle(RunnerHandle):
    url: str

    def __init__(self, backend: FlyBackend, spec: RunnerSpec, machine: Mapping[str, Any]) -> None:
        self.backend = backend
        self.spec = spec
        self.machine_id: str = machine["id"]
        self.instance_id: str | None = machine.get("instance_id")
        self.path = f"/v1/apps/{backend.fly_app}/machines/{self.machine_id}"
        self.url = backend.runner_url(machine)
        self._stopped = False

    async def connect(self, timeout: float | None) -> Channel:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        await self._wait_started(deadline, timeout)
        await self._wait_healthy(deadline, timeout)
        left = None if deadline is None else max(0.5, deadline - loop.time())
        return await connect_websocket(self.url, left, self.spec.info.max_payload, self.spec)

    async def _wait_started(self, deadline: float | None, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise BootError(f"Fly machine {self.machine_id} did not start within {timeout:g} s",
                                reason="boot timeout")
            wait = 60 if left is None else max(1, min(60, math.ceil(left)))  # the API waits 60 s at most
            params = {"state": "started", "timeout": wait, **({"instance_id": self.instance_id}
                                                              if self.instance_id else {})}
            try:
                await self.backend.api.request("GET", f"{self.path}/wait", params=params, timeout=wait + 10)
                return
            except FlyAPIError as exc:
                if exc.status != 408:
                    raise await self._failed(f"did not start ({exc.detail})") from None
            machine = await self._machine()  # 408: not started yet; or started and gone already?
            if machine is not None and machine.get("state") in DOWN_STATES:
                raise await self._failed("stopped before its runner answered", machine)

    async def _wait_healthy(self, deadline: float | None, timeout: float | None) -> None:
        # "started" means the machine's command runs, not that the app listens: poll until it does.
        loop = asyncio.get_running_loop()
        client = self.backend.runner_client()
        delay, next_check = 0.05, loop.time() + 1.0
        while True:
            try:
                response = await client.get(f"{self.url}/_flame/health")
            except httpx.TransportError:
                response = None
            if response is not None:
                self._check_health(response)
                return
            if loop.time() >= next_check:  # a runner that crashed while booting: say so, do not time out
                machine = await self._machine()
                if machine is not None and machine.get("state") in DOWN_STATES:
                    raise await self._failed("stopped before its runner answered", machine)
                next_check = loop.time() + 1.0
            if deadline is not None and loop.time() + delay >= deadline:
                raise BootError(f"the runner on Fly machine {self.machine_id} did not answer at {self.url} within "
                                f"{timeout:g} s; does it listen on [::]:{self.backend.port}? see `fly logs -a "
                                f"{self.backend.fly_app} -i {self.machine_id}`", reason="runner unreachable")
            await asyncio.sleep(delay)
            delay = min(delay * 1.3, 0.2)  # probes are cheap, a long gap between them is boot latency

    def _check_health(self, response: httpx.Response) -> None:
        try:
            runner_id = response.json().get("runner_id") if response.status_code == 200 else None
        except (ValueError, AttributeError):
            runner_id = None
        if runner_id == self.spec.runner_id:
            return
        if runner_id is None:
            raise BootError(f"{self.url}/_flame/health on Fly machine {self.machine_id} answered HTTP "
                            f"{response.status_code}: does the machine's command serve this flame_asgi app? "
                            f"(cmd={self.backend.command(self.spec)})", reason=f"HTTP {response.status_code}")
        raise BootError(f"{self.url} answers as runner {runner_id!r}, not {self.spec.runner_id!r}: runner_host maps "
                        "machines to the wrong address", reason="wrong runner")

    async def _machine(self) -> dict[str, Any] | None:
        try:
            machine = await self.backend.api.request("GET", self.path, timeout=5.0)
        except BootError:
            return None
        return machine if isinstance(machine, dict) else None

    async def _failed(self, what: str, machine: Mapping[str, Any] | None = None) -> BootError:
        machine = machine or await self._machine()
        why = str(describe_machine(machine)) if machine else f"Fly machine {self.machine_id}"
        return BootError(f"Fly machine {self.machine_id} {what}: {why}; see `fly logs -a {self.backend.fly_app} "
                         f"-i {self.machine_id}`", reason=why)

    async def stop(self, timeout: float) -> None:
        """Stop the machine (SIGTERM, SIGKILL after ``timeout``), then destroy it."""
        if self._stopped:
            return
        self._stopped = True
        grace = max(1, math.ceil(timeout))
        try:
            stop = {"signal": "SIGTERM", "timeout": f"{grace}s"}
            await self.backend.api.request("POST", f"{self.path}/stop", json=stop)
            await self.backend.api.request("GET", f"{self.path}/wait", timeout=grace + 10, params={
                "state": "stopped", "instance_id": self.instance_id or "", "timeout": grace})
        except BootError as exc:  # already stopped, or destroyed by auto_destroy: nothing to wait for
            log.debug("stopping Fly machine %s: %s", self.machine_id, exc)
        else:
            if self.backend.keep_stopped(self.machine_id):
                return  # stopped, kept for a later runner
        await self.backend.api.destroy(self.machine_id)

    async def exit_reason(self) -> ExitReason | None:
        if self._stopped:
            return None
        machine = await self._machine()
        if machine is not None and machine.get("state") == "started" and self.instance_id:
            # The connection often drops before the API has seen the exit: give it a moment.
            try:
                await self.backend.api.request("GET", f"{self.path}/wait", timeout=0.25, params={
                    "state": "stopped", "instance_id": self.instance_id, "timeout": 1})
                machine = await self._machine() or machine
            except BootError:
                pass  # still running: unreachable rather than dead
        return describe_machine(machine) if machine else None
