"""A runner that dies (kill -9, exit, out of memory) fails every call in flight on it at
once with ``RunnerLost`` saying why; the pool forgets it and serves the next call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import resource
import signal
import time
from collections.abc import Iterator

import pytest

from flame_asgi import FlamePool, ProcessBackend, RunnerLost
from flame_asgi.backends import RunnerSpec
from flame_asgi.backends._base import ExitReason
from flame_asgi.backends.process import ProcessRunnerHandle
from tests.reliability import work
from tests.reliability.support import active, alive, booted, failures, in_flight, kill, runner_pids, until

MiB = 1024 * 1024


async def test_kill_9_fails_every_call_in_flight_at_once_and_the_pool_recovers(tmp_path: pathlib.Path) -> None:
    backend = ProcessBackend(heartbeat_interval=1.0, heartbeat_timeout=30.0)  # the heartbeat cannot be what tells
    async with FlamePool("kill9", backend=backend, max_concurrency=10) as pool:
        calls = await in_flight(pool, tmp_path, 5)
        (rid, pid), = runner_pids(pool).items()
        killed_at = time.monotonic()
        kill(pid, signal.SIGKILL)
        async with asyncio.timeout(5):
            failed = await failures(calls)
        latest = max(at for _, at in failed) - killed_at
        print(f"\nrunner kill -9 -> 5 in-flight calls failed within {latest * 1000:.0f} ms")
        assert latest < 1.0
        for exc, _ in failed:
            assert isinstance(exc, RunnerLost)
            assert exc.runner_id == rid
            assert "killed by SIGKILL" in str(exc) and "out of memory, or by an operator" in str(exc)
        assert pool.stats().runners == [] and active(pool) == 0  # forgotten, no slot held
        assert await pool.call(work.pid) not in (pid, None)  # a new runner serves the next call
        assert active(pool) == 0


async def test_a_runner_that_exits_mid_call_says_its_exit_code(tmp_path: pathlib.Path) -> None:
    async with FlamePool("exit", backend=ProcessBackend(), max_concurrency=10) as pool:
        calls = await in_flight(pool, tmp_path, 2)
        calls.append(asyncio.create_task(pool.call(work.exit_now, 3)))
        async with asyncio.timeout(5):
            failed = await failures(calls)
        assert all(isinstance(e, RunnerLost) and "exited with code 3" in str(e) for e, _ in failed)
        assert await pool.call(work.square, 7) == 49


class AddressSpaceLimited(ProcessBackend):
    """Runners with RLIMIT_AS (what ``prlimit --as`` sets): allocations past it fail."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    async def boot(self, spec: RunnerSpec) -> ProcessRunnerHandle:
        handle = await super().boot(spec)
        resource.prlimit(handle.proc.pid, resource.RLIMIT_AS, (self.limit, self.limit))
        return handle


async def test_past_an_address_space_limit_the_caller_gets_memory_error_and_the_runner_lives() -> None:
    # With an rlimit the kernel refuses the allocation instead of killing the process:
    # the user's code gets MemoryError, which reaches the caller like any remote exception.
    async with FlamePool("rlimit", backend=AddressSpaceLimited(1024 * MiB)) as pool:
        pid = await pool.call(work.pid)
        with pytest.raises(MemoryError) as raised:
            await pool.call(work.allocate, 2048)
        assert any("Remote traceback" in note and "allocate" in note for note in raised.value.__notes__)
        assert await pool.call(work.allocate, 16) == 16 * MiB  # the same runner carries on
        assert await pool.call(work.pid) == pid


def _own_memory_cgroup() -> pathlib.Path | None:
    """This process's cgroup v1 memory directory, or cgroup v2 directory, if writable."""
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for base, wanted in ((pathlib.Path("/sys/fs/cgroup/memory"), "memory"),
                             (pathlib.Path("/sys/fs/cgroup"), "")):
            if controllers.split(",") == [wanted] or (wanted == "" and controllers == ""):
                directory = base / path.lstrip("/")
                if directory.is_dir() and os.access(directory, os.W_OK):
                    limit = "memory.limit_in_bytes" if wanted else "memory.max"
                    if wanted or (directory / limit).exists() or "memory" in _read(directory / "cgroup.controllers"):
                        return directory
    return None


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[pathlib.Path]:
    own = _own_memory_cgroup()
    if own is None:
        pytest.skip("no writable memory cgroup (v1 memory controller or v2 with memory) on this machine")
    group = own / f"flame-oom-{os.getpid()}"
    group.mkdir()
    try:
        v1 = (group / "memory.limit_in_bytes").exists()
        (group / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit))
        if not v1 and (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        yield group
    finally:
        for _ in range(100):  # the killed runner must be reaped before the group can go
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def oom_kills(group: pathlib.Path) -> int:
    for name in ("memory.oom_control", "memory.events"):
        for line in _read(group / name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


class MemoryLimited(ProcessBackend):
    """Runners inside a memory cgroup: past the limit the kernel OOM-kills them."""

    def __init__(self, group: pathlib.Path) -> None:
        super().__init__()
        self.group = group

    async def boot(self, spec: RunnerSpec) -> ProcessRunnerHandle:
        handle = await super().boot(spec)
        (self.group / "cgroup.procs").write_text(str(handle.proc.pid))
        return handle


async def test_an_oom_killed_runner_fails_its_calls_with_runner_lost_saying_so(tmp_path: pathlib.Path) -> None:
    with memory_cgroup(300 * MiB) as group:
        async with FlamePool("oom", backend=MemoryLimited(group), max_concurrency=10) as pool:
            pid = await pool.call(work.pid)
            others = await in_flight(pool, tmp_path, 2)
            with pytest.raises(RunnerLost) as raised:
                await asyncio.wait_for(pool.call(work.allocate, 1024), 30)
            assert oom_kills(group) >= 1  # it really was the kernel's OOM killer
            assert "killed by SIGKILL (killed: out of memory, or by an operator)" in str(raised.value)
            async with asyncio.timeout(5):
                failed = await failures(others)
            assert all(isinstance(e, RunnerLost) for e, _ in failed)
            assert not alive(pid)
            assert pool.stats().runners == [] and active(pool) == 0
            assert await pool.call(work.square, 12) == 144  # a fresh runner serves the next call


class SlowToExplain(ProcessBackend):
    """Its handles take a second to say how a runner ended, as a cloud API asked about a
    machine would (the pool waits up to 1.5 s for that answer before forgetting it)."""

    async def boot(self, spec: RunnerSpec) -> ProcessRunnerHandle:
        handle = await super().boot(spec)
        explain = handle.exit_reason

        async def slowly() -> ExitReason | None:
            await asyncio.sleep(1.0)
            return await explain()

        handle.exit_reason = slowly  # type: ignore[method-assign]
        return handle


async def test_calls_placed_after_a_runner_died_do_not_go_to_it(tmp_path: pathlib.Path) -> None:
    async with FlamePool("after-death", backend=SlowToExplain(), max=2, max_concurrency=10) as pool:
        (held,) = await in_flight(pool, tmp_path, 1)
        (pid,) = runner_pids(pool).values()
        (conn,) = [r.conn for r in booted(pool)]
        kill(pid)
        await until(lambda: conn.closed is not None, 5, "the parent to see the channel close")
        lost = 0
        for i in range(20):  # new calls, placed once the death is known
            try:
                assert await pool.call(work.square, i, timeout=30) == i * i
            except RunnerLost:
                lost += 1
        with pytest.raises(RunnerLost):
            await held  # the call that was on the runner is lost, rightly
        assert lost == 0, f"{lost} of 20 new calls were sent to the dead runner"
