"""LocalBackend: runners inside the parent's own process and event loop.

The default for development and tests. A local runner is a real ``RunnerSession`` behind
an in-memory channel, so calls are pickled, signed and verified exactly as they are for
a remote runner, and timeouts, cancellation, idle shutdown and ``report`` behave alike.
"""

from __future__ import annotations

import asyncio
import contextvars

from flame_asgi._runner.session import RunnerSession
from flame_asgi._wire.channel import Channel, MemoryChannel
from flame_asgi._wire.exits import ExitReason
from flame_asgi.backends._base import Backend, RunnerHandle, RunnerSpec

_current: contextvars.ContextVar[LocalRunnerHandle | None] = contextvars.ContextVar(
    "flame_local_runner", default=None
)


class LocalBackend(Backend):
    """Run each runner in this process (no isolation: for development and tests)."""

    name = "local"
    boots_app = False  # runners are sessions in this process: no app is booted

    def __init__(self, *, heartbeat_interval: float = 2.5, heartbeat_timeout: float = 10.0) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout

    async def boot(self, spec: RunnerSpec) -> LocalRunnerHandle:
        return LocalRunnerHandle(spec)

    @staticmethod
    def kill_current(reason: str = "killed") -> None:
        """From code running on a local runner: end that runner abruptly, as a crash would."""
        handle = _current.get()
        if handle is None:
            raise RuntimeError("kill_current() must be called from code running on a local runner")
        handle.kill(reason)

    def __repr__(self) -> str:
        return "LocalBackend()"


class LocalRunnerHandle(RunnerHandle):
    def __init__(self, spec: RunnerSpec) -> None:
        self.spec = spec
        self.session = RunnerSession(spec.info, spec.keys, local=True)
        self._task: asyncio.Task[str] | None = None
        self._runner_end: MemoryChannel | None = None
        self._killed: str | None = None

    async def connect(self, timeout: float | None) -> Channel:
        parent_end, runner_end = MemoryChannel.pair()
        self._runner_end = runner_end
        ctx = contextvars.copy_context()
        ctx.run(_current.set, self)
        self._task = asyncio.get_running_loop().create_task(self.session.serve(runner_end), context=ctx)
        return parent_end

    def kill(self, reason: str = "killed") -> None:
        self._killed = reason
        if self._runner_end is not None:
            self._runner_end.close(reason)  # first, so no frame leaves the dying runner
        self.session.abort(reason)

    async def stop(self, timeout: float) -> None:
        if self._task is None:
            return
        if self._runner_end is not None:
            await self._runner_end.aclose("stopped")
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()

    async def exit_reason(self) -> ExitReason | None:
        # A local runner has no process: kill() stands for a crash.
        return None if self._killed is None else ExitReason("gone", self._killed)
