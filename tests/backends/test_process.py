"""ProcessBackend details that the pool scenarios do not show."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
import warnings
from typing import Any

from flame_asgi import FlamePool, ProcessBackend
from flame_asgi.backends import RunnerSpec
from flame_asgi.backends.process import ProcessRunnerHandle
from tests import remote


async def test_a_fractional_stop_timeout_is_rounded_up_for_uvicorn() -> None:
    # uvicorn's graceful shutdown takes whole seconds: 1.5 s must give the runner 2, not 1.
    async with FlamePool("grace", backend=ProcessBackend(fork=False, stop_timeout=1.5)) as pool:
        pid = await pool.call(remote.pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[argv.index(b"--graceful") + 1] == b"2"


async def test_a_runners_subprocesses_do_not_inherit_its_listening_socket() -> None:
    async with FlamePool("fds", backend=ProcessBackend()) as pool:
        held = await pool.call(remote.subprocess_fds)
    assert not [fd for fd in held if fd.startswith("socket:")], held


class Unstoppable(ProcessBackend):
    """Boots real runners, and cannot stop them: a backend whose machines outlive its API."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.pids: list[int] = []

    async def boot(self, spec: RunnerSpec) -> ProcessRunnerHandle:
        handle = await super().boot(spec)
        self.pids.append(handle.proc.pid)

        async def cannot_stop(timeout: float | None = None) -> None:
            pass

        handle.stop = cannot_stop  # type: ignore[method-assign]
        return handle


def test_a_runner_that_cannot_be_stopped_leaves_no_pipe_open() -> None:
    # The pool closes, and its event loop ends, with the runner (forked, the default) still
    # up: its stderr pipe must be closed all the same, not left to the garbage collector.
    # Five times over, with every ResourceWarning and unraisable exception counted.
    leaks: list[str] = []
    hook, sys.unraisablehook = sys.unraisablehook, lambda raised: leaks.append(repr(raised.exc_value))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            for _ in range(5):
                backend = Unstoppable()

                async def use() -> None:
                    async with FlamePool("unstoppable", backend=backend) as pool:  # noqa: B023
                        await pool.call(remote.pid)
                asyncio.run(use())
                for pid in backend.pids:  # the runner outlived its loop: end it from outside
                    os.killpg(pid, signal.SIGKILL)
                    while alive(pid):
                        time.sleep(0.02)
                gc.collect()
    finally:
        sys.unraisablehook = hook
        for pid in backend.pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    assert leaks == []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def wakes(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid``: each is a sleep that ended."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/status") as status:
            total += sum(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt_switches:"))
    return total


async def test_an_idle_runner_sleeps_between_its_heartbeats() -> None:
    # With heartbeats far apart, an idle runner has nothing to wake for: uvicorn's main
    # loop (ten times a second, then every 5 s) woke it for the Date header alone. Its
    # exit on a signal is event-driven (tests/reliability: SIGTERM, lost parent).
    backend = ProcessBackend(heartbeat_interval=30.0, heartbeat_timeout=120.0)
    async with FlamePool("sleeper", backend=backend, idle_shutdown_after=None) as pool:
        pid = await pool.call(remote.pid)
        await asyncio.sleep(1.0)  # what the call set going has settled
        before = wakes(pid)
        await asyncio.sleep(6.0)
        assert wakes(pid) - before == 0
        assert await pool.call(remote.pid) == pid  # and it still answers at once
