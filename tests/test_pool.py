"""The Elixir library's pool scenarios (test/flame_test.exs), on LocalBackend and ProcessBackend."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from typing import Any

import pytest

from flame_asgi import Backend, BootError, CallTimeout, FlamePool, ProcessBackend, RunnerLost
from flame_asgi._wire.channel import Channel
from flame_asgi.backends import RunnerHandle, RunnerSpec
from flame_asgi.backends._base import ExitReason
from tests import remote
from tests.conftest import BackendFactory, until
from tests.idle import reapers_looked_past


def active(pool: FlamePool) -> int:
    return sum(r.active for r in pool.stats().runners)


async def gated_touch(gate: str, done: str) -> str:
    """Run on runners (by reference: this module is importable there): wait for ``gate``,
    then touch ``done``."""
    await remote.hold(gate)
    return remote.touch(done)


async def test_boots_min_grows_to_max_and_times_out_queued_callers(backend: BackendFactory,
                                                                   tmp_path: pathlib.Path) -> None:
    gate = str(tmp_path / "gate")
    async with FlamePool("grow", backend=backend(), min=1, max=2, max_concurrency=2) as pool:
        assert len(pool.stats().runners) == 1
        assert await pool.call(remote.works) == "works"
        held = [asyncio.create_task(pool.call(remote.hold, gate))]
        await until(lambda: active(pool) == 1)
        assert await pool.call(remote.works) == "works"
        assert len(pool.stats().runners) == 1  # one busy slot of two: no growth yet
        held.append(asyncio.create_task(pool.call(remote.hold, gate)))
        await until(lambda: active(pool) == 2)
        assert await pool.call(remote.works) == "works"  # both slots busy: a second runner boots
        assert len(pool.stats().runners) == 2
        held += [asyncio.create_task(pool.call(remote.hold, gate)) for _ in range(2)]
        await until(lambda: active(pool) == 4)
        with pytest.raises(CallTimeout, match="no free runner slot"):
            await pool.call(remote.works, timeout=0.1)
        assert pool.stats().waiting == 0  # the timed-out caller left the queue
        pathlib.Path(gate).touch()
        assert await asyncio.gather(*held) == ["held"] * 4
        assert await pool.call(remote.works) == "works"
        assert len(pool.stats().runners) == 2


async def test_concurrent_calls_while_the_only_runner_boots(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    gate = str(tmp_path / "gate")
    async with FlamePool("pending", backend=backend(), min=0, max=1, max_concurrency=2) as pool:
        calls = [asyncio.create_task(pool.call(remote.hold, gate, str(tmp_path / f"s{i}"))) for i in range(2)]
        await until(lambda: (tmp_path / "s0").exists() and (tmp_path / "s1").exists(), what="both calls running")
        assert len(pool.stats().runners) == 1
        pathlib.Path(gate).touch()
        assert await asyncio.gather(*calls) == ["held", "held"]


async def test_failed_boot_is_reported_and_retried(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    events: list[tuple[Any, ...]] = []

    def grow_start(meta: dict[str, Any]) -> None:
        events.append(("start", meta["count"]))
        if len(events) == 3:  # the second boot
            raise RuntimeError("boom")

    def grow_end(error: BaseException | None, meta: dict[str, Any]) -> None:
        events.append(("end", error is None, meta["count"]))

    gate = str(tmp_path / "gate")
    async with FlamePool("retry", backend=backend(), min=1, max=2, max_concurrency=1,
                         on_grow_start=grow_start, on_grow_end=grow_end) as pool:
        busy = asyncio.create_task(pool.call(remote.hold, gate))
        await until(lambda: active(pool) == 1)
        pool.cast(remote.touch, str(tmp_path / "fulfilled"))
        await until(lambda: ("end", False, 1) in events, what="the second boot to fail")
        # Retried, but not at once: the retry is queued, waiting out the retry interval (1 s,
        # far longer than until() takes to look again).
        assert events == [("start", 1), ("end", True, 1), ("start", 2), ("end", False, 1)]
        assert pool.stats().booting == 1
        await until(lambda: (tmp_path / "fulfilled").exists(), what="the queued cast to be served")
        assert events == [("start", 1), ("end", True, 1), ("start", 2), ("end", False, 1),
                          ("start", 2), ("end", True, 2)]
        assert await pool.call(remote.works) == "works"
        assert len(pool.stats().runners) == 2
        pathlib.Path(gate).touch()
        await busy


async def test_idle_runner_stops_and_min_runner_stays(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    shrinks: list[str] = []
    gate = str(tmp_path / "gate")
    async with FlamePool("idle", backend=backend(), min=1, max=2, max_concurrency=2, idle_shutdown_after=0.5,
                         on_shrink=lambda meta: shrinks.append(meta["reason"])) as pool:
        calls = [asyncio.create_task(pool.call(remote.hold, gate)) for _ in range(3)]
        await until(lambda: active(pool) == 3)
        assert len(pool.stats().runners) == 2
        pathlib.Path(gate).touch()
        await asyncio.gather(*calls)
        await until(lambda: len(pool.stats().runners) == 1, what="the extra runner to idle down")
        assert shrinks == ["idle"]
        (kept,) = pool.stats().runners
        await reapers_looked_past(0.5)  # this pool's reaper has seen it idle past idle_shutdown_after
        assert pool.stats().runners == [kept] and shrinks == ["idle"]


async def test_runner_death_fails_every_call_on_it_at_once(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    gate = str(tmp_path / "gate")
    async with FlamePool("death", backend=backend(), min=1, max=1, max_concurrency=2, timeout=60) as pool:
        victim = asyncio.create_task(pool.call(remote.hold, gate))
        await until(lambda: active(pool) == 1)
        with pytest.raises(RunnerLost):
            await pool.call(remote.die)
        with pytest.raises(RunnerLost) as lost:  # at once: at its 60 s timeout it would be CallTimeout
            await victim
        assert "lost" in str(lost.value)
        assert await pool.call(remote.works) == "works"  # the pool boots a replacement


async def test_process_runner_death_says_how_it_died(tmp_path: pathlib.Path) -> None:
    from flame_asgi import ProcessBackend

    async with FlamePool("signal", backend=ProcessBackend()) as pool:
        with pytest.raises(RunnerLost, match="SIGKILL"):
            await pool.call(remote.die)


async def test_linked_and_unlinked_failures_reach_the_caller(backend: BackendFactory) -> None:
    async with FlamePool("links", backend=backend(), max=1, max_concurrency=2, idle_shutdown_after=0.2) as pool:
        with pytest.raises(RunnerLost):
            await pool.call(remote.die)
        await until(lambda: not pool.stats().runners and not pool.stats().booting, what="runner gone")
        with pytest.raises(ValueError, match="remote boom"):
            await pool.call(remote.raise_value_error, link=False)
        await until(lambda: not pool.stats().runners, what="the runner to idle down")


async def test_unlinked_cast_that_raises_lets_the_runner_idle_down(backend: BackendFactory, tmp_path: pathlib.Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    async with FlamePool("castfail", backend=backend(), idle_shutdown_after=0.2) as pool:
        with caplog.at_level(logging.ERROR, logger="flame_asgi.pool"):
            pool.cast(remote.touch_then_raise, str(tmp_path / "ran"), link=False)
            await until(lambda: (tmp_path / "ran").exists())
            await until(lambda: "cast of touch_then_raise() failed" in caplog.text, what="the failure logged")
        await until(lambda: not pool.stats().runners, what="the runner to idle down")


async def test_cast_returns_at_once_and_runs_to_the_end(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    gate, done = tmp_path / "gate", tmp_path / "done"
    async with FlamePool("cast", backend=backend(), min=1) as pool:
        pool.cast(gated_touch, str(gate), str(done))  # returns while the work cannot finish
        await until(lambda: active(pool) == 1, what="the cast to run")
        assert not done.exists()
        gate.touch()
        await until(lambda: done.exists(), what="the cast to finish")


async def test_casts_grow_the_pool_to_max_and_no_further(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    counts: list[int] = []
    gate = tmp_path / "gate"
    async with FlamePool("castgrow", backend=backend(), min=0, max=2, max_concurrency=1,
                         on_grow_start=lambda meta: counts.append(meta["count"])) as pool:
        for i in range(3):
            pool.cast(gated_touch, str(gate), str(tmp_path / f"c{i}"))
        await until(lambda: active(pool) == 2 and pool.stats().waiting == 1, what="two casts running, one queued")
        assert counts == [1, 2] and len(pool.stats().runners) == 2 and pool.stats().booting == 0
        gate.touch()
        await until(lambda: all((tmp_path / f"c{i}").exists() for i in range(3)), what="all casts")
        assert counts == [1, 2]


async def test_linked_cast_failure_is_reported_on_the_caller_side(backend: BackendFactory,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    async with FlamePool("castlink", backend=backend()) as pool:
        with caplog.at_level(logging.ERROR, logger="flame_asgi.pool"):
            pool.cast(remote.raise_value_error)
            await until(lambda: "cast of raise_value_error() failed: ValueError: remote boom" in caplog.text)


async def test_boot_error_reaches_the_caller_with_its_reason(tmp_path: pathlib.Path) -> None:
    from flame_asgi import ProcessBackend

    backend = ProcessBackend(app="no_such_module_anywhere:app")
    async with FlamePool("badapp", backend=backend, boot_timeout=20) as pool:
        with pytest.raises(BootError, match="no_such_module_anywhere"):
            await pool.call(remote.works, timeout=5)


async def test_pool_fails_to_start_when_min_runners_cannot_boot() -> None:
    from flame_asgi import ProcessBackend

    pool = FlamePool("badmin", backend=ProcessBackend(app="no_such_module_anywhere:app"), min=1)
    with pytest.raises(BootError, match="could not boot its 1 min runner"):
        await pool.start()


class _StuckStop(RunnerHandle):
    """A real runner whose stop hangs until ``release`` is set, as a wedged backend API would."""

    def __init__(self, inner: RunnerHandle, backend: StuckStopBackend) -> None:
        self.inner = inner
        self.url = inner.url
        self.backend = backend

    async def connect(self, timeout: float | None) -> Channel:
        return await self.inner.connect(timeout)

    async def stop(self, timeout: float) -> None:
        self.backend.stuck.set()
        await self.backend.release.wait()
        await self.inner.stop(timeout)

    async def exit_reason(self) -> ExitReason | None:
        return await self.inner.exit_reason()


class StuckStopBackend(Backend):
    """ProcessBackend runners whose stop hangs until ``release`` is set."""

    name = "stuck-stop"
    stop_timeout = 0.2

    def __init__(self) -> None:
        self.process = ProcessBackend(stop_timeout=self.stop_timeout)
        self.stuck = asyncio.Event()
        self.release = asyncio.Event()
        self.closed = False

    async def start(self) -> None:
        await self.process.start()

    async def boot(self, spec: RunnerSpec) -> RunnerHandle:
        return _StuckStop(await self.process.boot(spec), self)

    async def aclose(self) -> None:
        self.closed = True
        await self.process.aclose()


async def test_close_waits_for_a_stuck_stop_only_as_long_as_the_backend_stops_runners() -> None:
    backend = StuckStopBackend()
    stopped: list[str] = []
    pool = FlamePool("stuck", backend=backend, idle_shutdown_after=0.1,
                     on_shrink=lambda meta: stopped.append(meta["reason"]))
    await pool.start()
    assert await pool.call(remote.works) == "works"
    await backend.stuck.wait()  # its idle stop is under way, and hangs
    async with asyncio.timeout(20):  # stop_timeout is 0.2 s: far less than the 30 s it waited before
        await pool.aclose()
    assert backend.closed and not backend.release.is_set()  # closed the backend without that stop
    backend.release.set()  # the stop goes on: the runner process still ends, and is reaped
    await until(lambda: stopped == ["idle"], what="the stuck stop to finish")
