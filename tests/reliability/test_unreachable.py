"""Boots that fail: a runner that never reaches its parent gives the caller a
``BootError`` that says what failed (not a bare timeout), and the runner, which the
parent could not stop either, exits by itself after its failsafe period
(``boot_timeout + 10 s``); a runner that dies while booting is reported as dead."""

from __future__ import annotations

import socket
import time

import pytest

from flame_asgi import BootError, FlamePool, ProcessBackend
from flame_asgi.backends import RunnerSpec
from flame_asgi.backends.process import ProcessRunnerHandle
from tests.reliability import work
from tests.reliability.netns import Netns, NetnsBackend
from tests.reliability.support import alive, kill, until

BOOT_TIMEOUT = 1.0
FAILSAFE = BOOT_TIMEOUT + 10.0  # what the pool puts in FLAME_PARENT


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MisaddressedBackend(ProcessBackend):
    """Starts real runners but hands the pool a wrong address, and cannot stop them: a
    backend whose API lost track of its machines (wrong port mapping, lost credentials)."""

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[ProcessRunnerHandle] = []
        self.booted: list[tuple[int, float]] = []  # (pid, started at)
        self.wrong_url = f"http://127.0.0.1:{_closed_port()}"

    async def boot(self, spec: RunnerSpec) -> ProcessRunnerHandle:
        handle = await super().boot(spec)
        self.handles.append(handle)
        self.booted.append((handle.proc.pid, time.monotonic()))
        handle.url = self.wrong_url

        async def cannot_stop(timeout: float | None = None) -> None:
            pass

        handle.stop = cannot_stop  # type: ignore[method-assign]
        return handle


@pytest.mark.slow
async def test_an_unreachable_runner_is_a_boot_error_and_exits_after_the_failsafe() -> None:
    backend = MisaddressedBackend()
    try:
        async with FlamePool("misaddressed", backend=backend, boot_timeout=BOOT_TIMEOUT) as pool:
            with pytest.raises(BootError) as raised:
                await pool.call(work.pid, timeout=2.5)
        message = str(raised.value)
        assert f"could not reach the runner at {backend.wrong_url}" in message and "ConnectionRefused" in message
        assert backend.booted, "no runner was started"
        # The parent gave up on them, and could not stop them: they must leave by themselves.
        await until(lambda: not any(alive(pid) for pid, _ in backend.booted), FAILSAFE + 10,
                    "the unreachable runners to exit")
        lived = [time.monotonic() - started for _, started in backend.booted]
        print(f"\nunreachable runners exited {min(lived):.1f}-{max(lived):.1f} s after they started "
              f"(failsafe {FAILSAFE:g} s after their app is up)")
        assert min(lived) >= FAILSAFE  # it was the failsafe, nothing else
    finally:
        for pid, _ in backend.booted:
            kill(pid)
        for handle in backend.handles:
            await handle.proc.wait()


@pytest.mark.slow
async def test_a_runner_behind_a_black_hole_is_a_boot_error_and_exits_after_the_failsafe(netns: Netns) -> None:
    netns.partition()  # packets to the runner's address vanish: connecting hangs, nothing is refused
    backend = NetnsBackend(netns, stoppable=False)
    try:
        async with FlamePool("black-hole", backend=backend, boot_timeout=BOOT_TIMEOUT) as pool:
            started = time.monotonic()
            with pytest.raises(BootError, match=r"because booting failed: .* boot_timeout=1 s"):
                await pool.call(work.pid, timeout=2.5)
            assert time.monotonic() - started < 2.5 + 1.0  # the caller's deadline, not later
        await until(lambda: all(h.proc.returncode is not None for h in backend.handles), FAILSAFE + 10,
                    "the unreachable runners to exit")
    finally:
        await backend.kill_all()


async def test_a_black_hole_boot_error_names_the_address_that_could_not_be_reached(netns: Netns) -> None:
    netns.partition()
    backend = NetnsBackend(netns)
    try:
        async with FlamePool("black-hole-message", backend=backend, boot_timeout=BOOT_TIMEOUT) as pool:
            with pytest.raises(BootError) as raised:
                await pool.call(work.pid, timeout=1.5)
        assert any(h.url in str(raised.value) for h in backend.handles), str(raised.value)
    finally:
        await backend.kill_all()


async def test_a_runner_that_dies_during_boot_is_reported_as_dead_with_its_output() -> None:
    backend = ProcessBackend(app="tests.reliability.no_such_module:app")
    with pytest.raises(BootError) as raised:
        async with FlamePool("dies-booting", backend=backend, min=1, boot_timeout=20):
            pass
    message = str(raised.value)
    assert "Could not import module" in message  # its last output is there today already...
    assert "runner process exited during boot" in message  # ...but not that it died
