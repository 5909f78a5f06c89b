"""ProcessBackend: each runner is a real copy of the app under uvicorn on this machine.

The parent binds a listening socket on 127.0.0.1 and hands it to uvicorn in the child
(forked from a template, see ``_fork_parent``, or ``python -m flame_asgi.backends._serve
<module:app> N``, a thin wrapper of ``uvicorn.Server``), so the port is known before it starts
and the first connection simply waits in the backlog until the app is up: no port race
and no polling. The child gets the parent's working directory and environment plus
``FLAME_PARENT`` and the channel key, runs in its own process group (so Ctrl-C reaches
the parent, which shuts runners down in order), and is reaped when stopped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Mapping

from flame_asgi._base.exceptions import BootError
from flame_asgi._base.settings import RUNNER_KEYS, SECRET
from flame_asgi._observe.runner_logs import RunnerOutput, relay_lines
from flame_asgi._wire.channel import Channel
from flame_asgi._wire.exits import ExitReason
from flame_asgi.backends._apps import BARE_APP
from flame_asgi.backends._base import Backend, RunnerHandle, RunnerSpec, connect_websocket
from flame_asgi.backends._fork_parent import ForkedProcess, ForkServer, ForkUnavailable
from flame_asgi.backends._toolkit import graceful_seconds

__all__ = ["BARE_APP", "ProcessBackend", "ProcessRunnerHandle", "describe_exit"]
log = logging.getLogger("flame_asgi.backends.process")


class ProcessBackend(Backend):
    """Boot runners as local ``uvicorn`` processes serving the same app in runner mode."""

    name = "process"

    def __init__(
        self,
        app: str | None = None,
        *,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        log_level: str = "warning",
        stop_timeout: float = 5.0,
        heartbeat_interval: float = 2.5,
        heartbeat_timeout: float = 10.0,
        fork: bool = True,
        memory_limit: int | None = None,
    ) -> None:
        self._app = app
        self.memory_limit = memory_limit
        self.fork = fork
        self._forkserver: ForkServer | None = None
        self.host = host
        self.env = dict(env or {})
        self.log_level = log_level
        self.stop_timeout = stop_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout

    async def start(self) -> None:
        """Start the fork server, so runners boot as forks of a pre-imported template."""
        if self.fork and self._forkserver is None and hasattr(os, "fork"):
            server = ForkServer(self.runner_app(), _without_root({**os.environ, **self.env,
                                                                  "PYTHONPATH": _pythonpath()}))
            try:
                await server.start()
            except ForkUnavailable as exc:
                log.warning("%s; runners boot as fresh interpreters", exc)
                return
            self._forkserver = server

    async def aclose(self) -> None:
        if self._forkserver is not None:
            await self._forkserver.aclose()
            self._forkserver = None

    async def boot(self, spec: RunnerSpec) -> ProcessRunnerHandle:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((self.host, 0))
            sock.listen(256)
            port = sock.getsockname()[1]
            url = f"http://{self.host}:{port}"
            graceful = graceful_seconds(self.stop_timeout)
            if self._forkserver is not None and self._forkserver.alive:
                try:
                    forked = await self._forkserver.spawn(
                        env={**self.env, **spec.env}, listen=sock, log_level=self.log_level,
                        ws_max_size=spec.info.max_payload + 64 * 1024, graceful=graceful)
                    return self._limited(ProcessRunnerHandle(forked, url, spec, self.stop_timeout))
                except ForkUnavailable as exc:
                    log.warning("%s; booting a fresh interpreter", exc)
                    # A fork that answers late holds this socket until it is killed, and
                    # could accept the parent's connection and drop it: take another port.
                    sock.close()
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.bind((self.host, 0))
                    sock.listen(256)
                    url = f"http://{self.host}:{sock.getsockname()[1]}"
            # The keys go through a pipe, not the environment: an exec'd process's initial
            # environment stays readable in /proc/<pid>/environ for its whole life.
            env = _without_root({**os.environ, **self.env, **spec.env, "PYTHONPATH": _pythonpath()})
            keys = env.pop(RUNNER_KEYS.name).encode()
            keys_read, keys_write = os.pipe()
            os.write(keys_write, keys)  # ~130 bytes: far below a pipe's buffer
            os.close(keys_write)
            cmd = [
                sys.executable, "-m", "flame_asgi.backends._serve", self.runner_app(), str(sock.fileno()),
                "--log-level", self.log_level,
                "--ws-max-size", str(spec.info.max_payload + 64 * 1024),
                "--graceful", str(graceful),
                "--keys-fd", str(keys_read),
            ]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, cwd=os.getcwd(), env=env, pass_fds=(sock.fileno(), keys_read),
                    stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as exc:
                raise BootError(f"could not start {sys.executable}: {exc}", reason=str(exc)) from None
            finally:
                os.close(keys_read)
        finally:
            sock.close()  # the child holds its own copy now
        return self._limited(ProcessRunnerHandle(proc, url, spec, self.stop_timeout))

    def _limited(self, handle: ProcessRunnerHandle) -> ProcessRunnerHandle:
        if self.memory_limit is not None:
            # RLIMIT_AS: past it allocations fail, so the user's code gets MemoryError (which
            # reaches the caller) rather than the OOM killer picking a victim. It counts
            # address space, not RSS: thread stacks and malloc arenas reserve plenty.
            limit = (self.memory_limit, self.memory_limit)
            try:
                resource.prlimit(handle.proc.pid, resource.RLIMIT_AS, limit)
            except (OSError, ValueError) as exc:
                _signal_group(handle.proc.pid, signal.SIGKILL)  # not left running unlimited
                raise BootError(f"could not limit the runner's memory to {self.memory_limit:,} bytes: {exc}",
                                reason=str(exc)) from None
        return handle

    def __repr__(self) -> str:
        return f"ProcessBackend(app={self.runner_app()!r}, host={self.host!r})"


class ProcessRunnerHandle(RunnerHandle):
    def __init__(self, proc: asyncio.subprocess.Process | ForkedProcess, url: str, spec: RunnerSpec,
                 stop_timeout: float) -> None:
        self.proc = proc
        self.url: str = url
        self.spec = spec
        self._stop_timeout = stop_timeout
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        loop = asyncio.get_running_loop()
        self._stderr = loop.create_task(self._pump_stderr())
        # Whoever ends the process (stop(), its failsafe, a kill from outside), its pipes are
        # closed once it has: a backend that never gets to stop it leaks nothing either.
        self._released = loop.create_task(self._release_when_exited())

    async def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        # Tagged, rate-limited; the runner's JSON log lines become records again (_runner_logs).
        await relay_lines(self.proc.stderr, RunnerOutput(self.spec.pool, self.spec.runner_id), self._tail)

    async def _release_when_exited(self) -> None:
        try:
            await self.proc.wait()
            # Its last lines, up to the end of file; none may come when something outside the
            # runner's group still holds its stderr (the fork server, a grandchild).
            await asyncio.wait_for(asyncio.shield(self._stderr), 1.0)
        except (TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self._stderr.cancel()
            if isinstance(self.proc, ForkedProcess):
                self.proc.close_stderr()
            else:
                transport = getattr(self.proc, "_transport", None)  # asyncio gives no public handle on it
                if transport is not None:
                    transport.close()

    def output_tail(self, lines: int = 15) -> str:
        return "\n".join(list(self._tail)[-lines:])

    async def connect(self, timeout: float | None) -> Channel:
        connecting = asyncio.ensure_future(connect_websocket(self.url, timeout, self.spec.info.max_payload, self.spec))
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait({connecting, exited}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            connecting.cancel()
            connecting.add_done_callback(_consume)
            raise
        finally:
            exited.cancel()
        if connecting.done() and connecting.exception() is None:
            return connecting.result()
        if not connecting.done():
            connecting.cancel()
            connecting.add_done_callback(_consume)
        try:
            # A refused or broken connection usually means the runner is dying (its app
            # failed to import, its lifespan raised): give it a moment to say so by exiting.
            await asyncio.wait_for(self.proc.wait(), 0.5)
        except TimeoutError:
            pass
        await asyncio.sleep(0.05)  # let the stderr pump read the last lines
        tail = self.output_tail()
        if self.proc.returncode is not None:
            raise BootError(
                f"runner process exited during boot ({describe_exit(self.proc.returncode)}); "
                f"its last output:\n{tail or '(nothing)'}",
                reason=describe_exit(self.proc.returncode).detail,
            )
        error = connecting.exception()
        assert isinstance(error, BaseException)
        if isinstance(error, BootError):
            raise BootError(f"{error}\nrunner output so far:\n{tail or '(nothing)'}", reason=error.reason)
        raise error

    async def stop(self, timeout: float | None = None) -> None:
        grace = self._stop_timeout if timeout is None else timeout
        if self.proc.returncode is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                _signal_group(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()  # reap: no zombies
        _signal_group(self.proc.pid, signal.SIGKILL)  # anything the runner left behind in its group
        await asyncio.shield(self._released)  # its pipes closed, whatever cancels this stop

    async def exit_reason(self) -> ExitReason | None:
        code = await self.proc.wait()
        return describe_exit(code)


def _consume(task: asyncio.Future[Channel]) -> None:
    if not task.cancelled():
        task.exception()  # an abandoned connection attempt's error is expected: do not warn


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def describe_exit(code: int) -> ExitReason:
    if code == ForkedProcess.STATUS_LOST:  # not a SIGKILL: nobody knows how it ended
        return ExitReason("gone", "runner process is gone (its exit status was lost with the fork server)")
    return ExitReason.from_status("runner process", code)


def _without_root(env: dict[str, str]) -> dict[str, str]:
    """A runner's environment never carries the parent's root secret (it gets its own keys)."""
    env.pop(SECRET.name, None)
    return env


def _pythonpath() -> str:
    """The parent's import path minus the interpreter's own: the runner imports the same code."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    extra = [p for p in sys.path if p and not any(p.startswith(x) for x in prefixes)]
    current = os.environ.get("PYTHONPATH")
    return os.pathsep.join([os.getcwd(), *extra, *([current] if current else [])])
