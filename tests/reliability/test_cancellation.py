"""Timeouts and cancelled callers stop the remote work: async code is cancelled, sync
code is interrupted, and a runner whose sync code cannot be stopped (blocked in C) is
recycled. No slot leaks: the active counts return to 0."""

from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any

import pytest

from flame_asgi import CallTimeout, FlamePool, ProcessBackend
from tests.reliability import work
from tests.reliability.support import active, alive, runner_pids, until


def _pool(name: str, shrinks: list[str], **options: Any) -> FlamePool:
    return FlamePool(name, backend=ProcessBackend(heartbeat_interval=0.5), min=1, idle_shutdown_after=None,
                     on_shrink=lambda meta: shrinks.append(meta["reason"]), **options)


async def test_timeout_and_cancellation_stop_async_work_on_the_runner(tmp_path: pathlib.Path) -> None:
    shrinks: list[str] = []
    async with _pool("cancel-async", shrinks) as pool:
        with pytest.raises(CallTimeout, match="cancelled on the runner"):
            await pool.call(work.touch_after, 1.0, str(tmp_path / "timed-out"), timeout=0.3)
        assert active(pool) == 0
        task = asyncio.create_task(pool.call(work.touch_after, 1.0, str(tmp_path / "cancelled"),
                                             str(tmp_path / "started")))
        await until((tmp_path / "started").exists, 10, "the call to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert active(pool) == 0  # the slot is free at once
        await asyncio.sleep(1.2)
        assert not (tmp_path / "timed-out").exists() and not (tmp_path / "cancelled").exists()
        assert shrinks == []  # async work stops cleanly: the runner is kept


async def test_sync_python_code_is_interrupted_and_the_runner_kept(tmp_path: pathlib.Path) -> None:
    shrinks: list[str] = []
    async with _pool("cancel-spin", shrinks) as pool:
        with pytest.raises(CallTimeout):
            await pool.call(work.spin, 1.5, str(tmp_path / "started"), str(tmp_path / "done"), timeout=0.3)
        assert active(pool) == 0
        await asyncio.sleep(STUCK_GRACE + 0.5)
        assert not (tmp_path / "done").exists()
        assert shrinks == [] and len(pool.stats().runners) == 1  # interrupted: no recycling needed


STUCK_GRACE = 2.0  # flame_asgi._runner.work.STUCK_THREAD_GRACE


async def test_sync_code_blocked_in_c_gets_its_runner_recycled_without_leaking_slots(tmp_path: pathlib.Path) -> None:
    shrinks: list[str] = []
    started, done = tmp_path / "started", tmp_path / "done"
    async with _pool("cancel-blocked", shrinks, max=2) as pool:
        first = await pool.call(work.pid)
        (old_pid,) = runner_pids(pool).values()
        # Another call on the same runner, still running when the recycling is asked for.
        gate = tmp_path / "gate"
        neighbour = asyncio.create_task(pool.call(work.wait_for, str(gate), str(tmp_path / "neighbour-started")))
        await until((tmp_path / "neighbour-started").exists, 10, "the neighbouring call to start")
        stuck = asyncio.create_task(pool.call(work.blocked_in_c, 30, str(started), str(done)))
        await until(started.exists, 10, "the blocking call to start")
        cancelled_at = time.monotonic()
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert active(pool) == 1  # the cancelled call's slot is free at once; the neighbour's is not
        # ~2 s later the runner asks to be recycled: it takes no new work...
        await asyncio.sleep(STUCK_GRACE + 0.5)
        assert await pool.call(work.pid) not in (first, None)  # served by a second runner
        assert alive(old_pid)  # ...but lives on until its last call (the neighbour) is done
        gate.touch()
        assert await neighbour == "opened"
        await until(lambda: not alive(old_pid), 10, "the recycled runner to stop")
        stopped = time.monotonic() - cancelled_at
        print(f"\nsync call blocked in C, cancelled -> runner recycled and gone {stopped:.2f} s later "
              "(once its other call ended)")
        await until(lambda: shrinks == ["recycled"], 5, "on_shrink")
        assert len(pool.stats().runners) == 1 and active(pool) == 0
        assert not done.exists()


async def test_an_idle_runner_with_a_stuck_thread_is_stopped_about_two_seconds_after_the_cancel(
        tmp_path: pathlib.Path) -> None:
    shrinks: list[str] = []
    async with _pool("cancel-blocked-idle", shrinks) as pool:
        with pytest.raises(CallTimeout):
            await pool.call(work.blocked_in_c, 30, str(tmp_path / "started"), str(tmp_path / "done"), timeout=0.5)
        (pid,) = runner_pids(pool).values()
        assert active(pool) == 0
        took = await until(lambda: not alive(pid), STUCK_GRACE + 5, "the runner with a stuck thread to stop")
        print(f"\nsync call blocked in C, timed out -> idle runner stopped {took:.2f} s later")
        assert took >= STUCK_GRACE - 0.5
        await until(lambda: shrinks == ["recycled"], 5, "on_shrink")
        assert pool.stats().runners == []
        assert await pool.call(work.square, 5) == 25
