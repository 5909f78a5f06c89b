"""A fake Fly Machines API for FlyBackend's tests: a real HTTP server whose machines are processes.

It serves, on 127.0.0.1 in a thread of its own, the endpoints FlyBackend uses, as the
public reference documents them (JSON bodies; errors are ``{"error": ..., "status": ...}``):

    GET    /v1/apps/{app}/machines                   list the machines (?include_deleted=true) -> 200 [machine]
    POST   /v1/apps/{app}/machines                   create and start a machine -> 200 machine
                                                     ({"skip_launch": true}: created, not started)
    GET    /v1/apps/{app}/machines/{id}              the machine, state and events -> 200 | 404
    POST   /v1/apps/{app}/machines/{id}              update its config (a new instance_id); a running
                                                     machine restarts with it, a stopped or created
                                                     one starts unless "skip_launch" -> 200 machine
    POST   /v1/apps/{app}/machines/{id}/start        start a created or stopped machine
                                                     -> 200 {"previous_state": ...} | 404
    GET    /v1/apps/{app}/machines/{id}/wait         ?state=started|stopped|destroyed&timeout=S
                                                     &instance_id (needed for stopped)
                                                     -> 200 {"ok": true} | 400 | 408 on timeout
    POST   /v1/apps/{app}/machines/{id}/stop         {"signal": "SIGTERM", "timeout": "5s"} -> 200 | 404
    DELETE /v1/apps/{app}/machines/{id}?force=true   -> 200 | 404 | 412 if running and not forced

Every request needs ``Authorization: Bearer <token>`` (or ``FlyV1 <token>``): else 401.
Another app name answers 404. ``fail_next`` makes the next requests of an action fail
with a chosen status (429, 409, 412, 422, ...), to exercise retries.

A machine is a local process: ``config.init.cmd`` (or ``default_cmd``, standing in for
the image's CMD) with ``python`` mapped to this interpreter and ``--host`` to the
machine's own loopback address (127.0.0.N), run in its own process group with ONLY
``config.env``, ``PATH``/``PYTHONPATH`` and the ``FLY_*`` variables Fly sets. Its
``private_ip`` is a 6PN-like IPv6 address; ``reachable_host`` maps a machine to its
loopback address (pass it as ``FlyBackend(runner_host=fake.reachable_host)``). When the
process exits an exit event is recorded and the machine is stopped, or destroyed with
``auto_destroy``. Destroying kills and reaps the process; closing the fake kills them all.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flame_asgi.backends.process import _pythonpath

Handler = Callable[[Request], Awaitable[Response]]
WAIT_STATES = ("started", "stopped", "suspended", "destroyed")


@dataclasses.dataclass
class FakeMachine:
    number: int
    id: str
    name: str
    region: str
    instance_id: str
    private_ip: str
    address: str  # the loopback address its process listens on
    config: dict[str, Any]
    state: str = "created"
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    watcher: asyncio.Task[None] | None = None
    output: collections.deque[str] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=200))
    stop_requested: bool = False
    oom_killed: bool = False

    def event(self, type_: str, status: str, source: str = "flyd", **request: Any) -> None:
        entry: dict[str, Any] = {"type": type_, "status": status, "source": source,
                                 "timestamp": int(time.time() * 1000)}
        if request:
            entry["request"] = request
        self.events.insert(0, entry)  # newest first, as the API lists them

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "state": self.state, "region": self.region,
                "instance_id": self.instance_id, "private_ip": self.private_ip, "config": self.config,
                "image_ref": {"registry": "registry.fly.io", "repository": self.config.get("image", "")},
                "events": [dict(e) for e in self.events]}


class FakeFly:
    """The fake API server. ``with FakeFly() as fake:`` starts it; ``fake.url`` is its base URL."""

    def __init__(self, *, token: str = "fake-fly-token", app: str = "flame-test", region: str = "ord",
                 default_cmd: list[str] | None = None, start_delay: float = 0.0) -> None:
        self.token = token
        self.app = app
        self.region = region
        self.default_cmd = default_cmd
        self.start_delay = start_delay
        self.pythonpath = _pythonpath()
        self.url = ""
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), in order
        self.bodies: list[dict[str, Any]] = []  # every create request body received
        self._machines: dict[str, FakeMachine] = {}
        self._failures: dict[str, collections.deque[tuple[int, str, str | None]]] = collections.defaultdict(
            collections.deque)
        self._count = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._changed: asyncio.Condition | None = None
        self._error: BaseException | None = None

    # -- test-side API (any thread) ------------------------------------------------------
    def __enter__(self) -> FakeFly:
        self._thread = threading.Thread(target=self._run, name="fake-fly", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"the fake Fly API did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(20)

    def fail_next(self, action: str, status: int, *, times: int = 1, error: str = "injected failure",
                  retry_after: str | None = None) -> None:
        """Make the next ``times`` requests of ``action`` (list, create, get, update, start, wait,
        stop, delete) fail."""
        with self._lock:
            self._failures[action].extend([(status, error, retry_after)] * times)

    def count(self, method: str, suffix: str = "/machines") -> int:
        return sum(1 for m, path, _ in list(self.requests) if m == method and path.endswith(suffix))

    def reachable_host(self, machine: Mapping[str, Any]) -> str:
        """Where the parent reaches ``machine`` (the API's JSON): its loopback address."""
        return self._call(self._address(str(machine["id"])))

    def machines(self) -> list[dict[str, Any]]:
        """Every machine ever created, with ``pid`` and ``returncode`` of its process."""
        return self._call(self._snapshot())

    def logs(self, machine_id: str) -> str:
        return self._call(self._logs(machine_id))

    def oom_kill(self, machine_id: str) -> None:
        """Kill the machine's process as the kernel's OOM killer would (SIGKILL, ``oom_killed``)."""
        self._call(self._oom_kill(machine_id))

    def _call(self, coro: Awaitable[Any]) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _address(self, machine_id: str) -> str:
        return self._machines[machine_id].address

    async def _snapshot(self) -> list[dict[str, Any]]:
        return [{**m.to_json(), "pid": m.proc.pid if m.proc else None,
                 "returncode": m.proc.returncode if m.proc else None} for m in self._machines.values()]

    async def _logs(self, machine_id: str) -> str:
        return "\n".join(self._machines[machine_id].output)

    async def _oom_kill(self, machine_id: str) -> None:
        machine = self._machines[machine_id]
        if machine.proc is not None and machine.proc.returncode is None:
            machine.oom_killed = True
            _killpg(machine.proc.pid, signal.SIGKILL)

    # -- the server thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._changed = asyncio.Condition()
        base = "/v1/apps/{app}/machines"
        app = Starlette(routes=[
            Route(base, self._route("list", self._list), methods=["GET"]),
            Route(base, self._route("create", self._create), methods=["POST"]),
            Route(base + "/{id}", self._route("get", self._get), methods=["GET"]),
            Route(base + "/{id}", self._route("update", self._update), methods=["POST"]),
            Route(base + "/{id}/start", self._route("start", self._start_machine), methods=["POST"]),
            Route(base + "/{id}", self._route("delete", self._delete), methods=["DELETE"]),
            Route(base + "/{id}/wait", self._route("wait", self._wait), methods=["GET"]),
            Route(base + "/{id}/stop", self._route("stop", self._stop_machine), methods=["POST"]),
        ])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                                  timeout_graceful_shutdown=1))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        self._ready.set()
        await self._stop.wait()
        for machine in list(self._machines.values()):
            await self._destroy(machine)
        server.should_exit = True
        await serving
        sock.close()

    def _route(self, action: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            response = await self._guard(action, request) or await handler(request)
            self.requests.append((request.method, request.url.path, response.status_code))
            return response
        return endpoint

    async def _guard(self, action: str, request: Request) -> Response | None:
        if request.headers.get("authorization") not in (f"Bearer {self.token}", f"FlyV1 {self.token}"):
            return _error(401, "You must be authenticated to view this.", "unauthorized")
        if request.path_params["app"] != self.app:
            return _error(404, f"app {request.path_params['app']} not found", "not_found")
        with self._lock:
            failure = self._failures[action].popleft() if self._failures[action] else None
        if failure is not None:
            status, message, retry_after = failure
            headers = {"retry-after": retry_after} if retry_after is not None else None
            return _error(status, message, _STATUS_NAMES.get(status, "unknown"), headers)
        if "id" in request.path_params and request.path_params["id"] not in self._machines:
            return _error(404, "machine not found", "not_found")
        return None

    # -- endpoints --------------------------------------------------------------------------
    async def _create(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid JSON body", "invalid_argument")
        self.bodies.append(body)
        config = body.get("config") or {}
        if not config.get("image"):
            return _error(400, "invalid config.image: image is required", "invalid_argument")
        policy = (config.get("restart") or {}).get("policy", "")
        if policy not in ("", "no", "always", "on-failure"):
            return _error(400, f"invalid restart policy {policy!r}", "invalid_argument")
        cmd = (config.get("init") or {}).get("cmd") or self.default_cmd
        if not cmd:
            return _error(422, "the fake has no image CMD: set config.init.cmd", "invalid_argument")
        self._count += 1
        n = self._count
        machine = FakeMachine(
            number=n, id=secrets.token_hex(7), name=body.get("name") or f"fake-machine-{n}",
            region=body.get("region") or self.region, instance_id=secrets.token_hex(13).upper(),
            private_ip=f"fdaa:0:f1a:a7b:{n:x}:0:0:2", address=f"127.0.{n // 250}.{n % 250 + 2}", config=config)
        self._machines[machine.id] = machine
        machine.event("launch", "created", source="user")
        if not body.get("skip_launch"):
            asyncio.get_running_loop().create_task(self._start(machine))
        return JSONResponse(machine.to_json())

    async def _list(self, request: Request) -> Response:
        deleted = request.query_params.get("include_deleted") == "true"
        return JSONResponse([m.to_json() for m in self._machines.values() if deleted or m.state != "destroyed"])

    async def _update(self, request: Request) -> Response:
        machine = self._machines[request.path_params["id"]]
        if machine.state == "destroyed":
            return _error(404, "machine not found", "not_found")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid JSON body", "invalid_argument")
        config = body.get("config") or {}
        if not config.get("image"):
            return _error(400, "invalid config.image: image is required", "invalid_argument")
        running = machine.state in ("started", "stopping", "starting")
        if running and machine.proc is not None:  # the new config takes a restart
            machine.stop_requested = True
            _killpg(machine.proc.pid, signal.SIGTERM)
            asyncio.get_running_loop().call_later(5, _kill_if_alive, machine.proc)
            if machine.watcher is not None:
                await machine.watcher
        machine.config = config
        machine.instance_id = secrets.token_hex(13).upper()
        machine.stop_requested = machine.oom_killed = False
        machine.event("update", "replaced", source="user")
        if machine.state != "destroyed":
            await self._set_state(machine, "created" if machine.state == "created" else "stopped")
            if not body.get("skip_launch"):
                asyncio.get_running_loop().create_task(self._start(machine))
        return JSONResponse(machine.to_json())

    async def _start_machine(self, request: Request) -> Response:
        machine = self._machines[request.path_params["id"]]
        previous = machine.state
        if previous == "destroyed":
            return _error(404, "machine not found", "not_found")
        if previous in ("created", "stopped"):
            await self._set_state(machine, "starting")
            asyncio.get_running_loop().create_task(self._start(machine))
        return JSONResponse({"previous_state": previous, "migrated": False, "new_host": ""})

    async def _get(self, request: Request) -> Response:
        return JSONResponse(self._machines[request.path_params["id"]].to_json())

    async def _wait(self, request: Request) -> Response:
        machine = self._machines[request.path_params["id"]]
        state = request.query_params.get("state", "started")
        if state not in WAIT_STATES:
            return _error(400, f"invalid state {state!r}", "invalid_argument")
        if state == "stopped" and not request.query_params.get("instance_id"):
            return _error(400, "instance_id is required when waiting for stopped", "invalid_argument")
        timeout = min(60, int(request.query_params.get("timeout", "60")))
        wanted = {"stopped": ("stopped", "destroyed")}.get(state, (state,))

        def settled() -> bool:
            return machine.state in wanted or (state == "started" and machine.state in ("stopped", "destroyed",
                                                                                         "failed"))
        assert self._changed is not None
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(settled), timeout)
            except TimeoutError:
                return _error(408, f"deadline_exceeded: machine did not reach {state}", "deadline_exceeded")
        if machine.state not in wanted:
            return _error(400, f"machine {machine.id} is {machine.state}; it will not reach {state}",
                          "failed_precondition")
        return JSONResponse({"ok": True})

    async def _stop_machine(self, request: Request) -> Response:
        machine = self._machines[request.path_params["id"]]
        if machine.state == "destroyed":
            return _error(404, "machine not found", "not_found")
        body = await request.json() if await request.body() else {}
        if machine.proc is not None and machine.proc.returncode is None and machine.state != "stopping":
            sig = _signal(body.get("signal") or "SIGINT")
            grace = float(str(body.get("timeout") or "5").rstrip("s"))
            machine.stop_requested = True
            await self._set_state(machine, "stopping")
            _killpg(machine.proc.pid, sig)
            asyncio.get_running_loop().call_later(grace, _kill_if_alive, machine.proc)
        return JSONResponse({"ok": True})

    async def _delete(self, request: Request) -> Response:
        machine = self._machines[request.path_params["id"]]
        if machine.state == "destroyed":
            return _error(404, "machine not found", "not_found")
        if machine.state in ("started", "stopping") and request.query_params.get("force") != "true":
            return _error(412, "failed_precondition: unable to destroy machine, not currently stopped",
                          "failed_precondition")
        await self._destroy(machine)
        return JSONResponse({"ok": True})

    # -- machine lifecycle ------------------------------------------------------------------
    async def _start(self, machine: FakeMachine) -> None:
        await asyncio.sleep(self.start_delay)
        if machine.state not in ("created", "stopped", "starting"):
            return
        cmd = list((machine.config.get("init") or {}).get("cmd") or self.default_cmd or [])
        argv = [sys.executable if cmd[0] in ("python", "python3") else cmd[0], *cmd[1:]]
        for i, arg in enumerate(argv[:-1]):
            if arg == "--host":  # the machine's own interface
                argv[i + 1] = machine.address
        env = {str(k): str(v) for k, v in (machine.config.get("env") or {}).items()}
        env.update(PATH=os.environ.get("PATH", ""), PYTHONPATH=self.pythonpath, FLY_APP_NAME=self.app,
                   FLY_MACHINE_ID=machine.id, FLY_ALLOC_ID=machine.id, FLY_REGION=machine.region,
                   FLY_IMAGE_REF=machine.config["image"], FLY_PRIVATE_IP=machine.private_ip,
                   FLY_MACHINE_VERSION=machine.instance_id)
        try:
            machine.proc = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=os.getcwd(), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            machine.output.append(f"failed to start {argv[0]}: {exc}")
            machine.event("launch", "failed")
            await self._set_state(machine, "failed")
            return
        machine.event("start", "started")
        await self._set_state(machine, "started")
        machine.watcher = asyncio.create_task(self._watch(machine, machine.proc))

    async def _watch(self, machine: FakeMachine, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            machine.output.append(line.decode(errors="replace").rstrip())
        code = await proc.wait()
        _killpg(proc.pid, signal.SIGKILL)  # whatever it left in its group
        killed = -code if code < 0 else 0
        machine.event("exit", "stopped", exit_event={
            "exit_code": 128 + killed if killed else code, "signal": killed, "oom_killed": machine.oom_killed,
            "requested_stop": machine.stop_requested, "guest_exit_code": code if code >= 0 else 0})
        if machine.state == "destroyed":
            return
        if machine.config.get("auto_destroy"):
            machine.event("destroy", "destroyed")
            await self._set_state(machine, "destroyed")
        else:
            await self._set_state(machine, "stopped")

    async def _destroy(self, machine: FakeMachine) -> None:
        if machine.proc is not None:
            if machine.proc.returncode is None:
                _killpg(machine.proc.pid, signal.SIGKILL)
            await machine.proc.wait()  # reaped: no zombie
            if machine.watcher is not None:
                await machine.watcher
        if machine.state != "destroyed":
            machine.event("destroy", "destroyed", source="user")
            await self._set_state(machine, "destroyed")

    async def _set_state(self, machine: FakeMachine, state: str) -> None:
        assert self._changed is not None
        async with self._changed:
            machine.state = state
            self._changed.notify_all()


_STATUS_NAMES = {400: "invalid_argument", 404: "not_found", 408: "deadline_exceeded", 409: "conflict",
                 412: "failed_precondition", 422: "insufficient_capacity", 429: "rate_limited",
                 503: "unavailable"}


def _error(status: int, message: str, code: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": code}, status_code=status, headers=headers)


def _signal(value: Any) -> signal.Signals:
    if isinstance(value, int) or str(value).isdigit():
        return signal.Signals(int(value))
    name = str(value).upper()
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def _killpg(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_if_alive(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        _killpg(proc.pid, signal.SIGKILL)
