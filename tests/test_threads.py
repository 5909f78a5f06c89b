"""ElasticThreadPool: the runner's threads for sync remote code, used through run_in_executor."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flame_asgi._runner.threads import ElasticThreadPool
from tests.conftest import until


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flame-work")]


@pytest.fixture
async def pool() -> ElasticThreadPool:
    return ElasticThreadPool(asyncio.get_running_loop(), core=4, max_workers=64)


async def test_a_burst_of_trivial_calls_does_not_start_a_thread_per_call(pool: ElasticThreadPool) -> None:
    loop = asyncio.get_running_loop()
    try:
        results = await asyncio.gather(*(loop.run_in_executor(pool, abs, -i) for i in range(500)))
        assert results == list(range(500))
        # A thread per call would be 64 (max_workers); the 4 core threads keep up, give or take
        # one started while the machine was too loaded to run them for a few milliseconds.
        assert len(workers()) < 16
    finally:
        pool.shutdown()


async def test_blocking_calls_still_run_side_by_side(pool: ElasticThreadPool) -> None:
    loop = asyncio.get_running_loop()
    meeting = threading.Barrier(20, timeout=30)  # more than the 4 core threads must be waiting at once
    try:
        arrivals = await asyncio.gather(*(loop.run_in_executor(pool, meeting.wait) for _ in range(20)))
        assert sorted(arrivals) == list(range(20))
    finally:
        pool.shutdown()


async def test_threads_started_for_blocked_work_retire_when_idle() -> None:
    loop = asyncio.get_running_loop()
    pool = ElasticThreadPool(loop, core=2, max_workers=64, retire_after=0.05)
    meeting = threading.Barrier(10, timeout=30)
    try:
        await asyncio.gather(*(loop.run_in_executor(pool, meeting.wait) for _ in range(10)))
        await until(lambda: len(workers()) == 2, what="the extra threads to retire, the 2 core ones to stay")
        assert await loop.run_in_executor(pool, abs, -1) == 1
    finally:
        pool.shutdown()


async def test_shutdown_cancels_queued_calls_and_lets_the_running_one_finish() -> None:
    loop = asyncio.get_running_loop()
    pool = ElasticThreadPool(loop, core=1, max_workers=1)
    started, release = threading.Event(), threading.Event()

    def blocked() -> bool:
        started.set()
        return release.wait(30)

    running = loop.run_in_executor(pool, blocked)
    await loop.run_in_executor(None, started.wait, 30)
    queued = [loop.run_in_executor(pool, abs, -i) for i in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)
    for fut in queued:
        with pytest.raises(asyncio.CancelledError):
            await fut
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(abs, -1)
    release.set()
    assert await running is True
    await until(lambda: not workers(), what="the pool's thread to exit")


async def test_a_call_that_raises_base_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    class Interrupted(BaseException):
        pass

    def interrupted() -> None:
        raise Interrupted

    loop = asyncio.get_running_loop()
    pool = ElasticThreadPool(loop, core=1, max_workers=1)
    try:
        with pytest.raises(Interrupted):
            await loop.run_in_executor(pool, interrupted)
        assert await loop.run_in_executor(pool, abs, -2) == 2
        assert len(workers()) == 1
    finally:
        pool.shutdown()
