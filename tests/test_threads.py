"""ElasticThreadPool: the runner's threads for sync remote code, used through its own ``run``
(as the runner does) and through ``loop.run_in_executor`` (as any Executor)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from flame_asgi._runner.threads import ElasticThreadPool
from tests.conftest import until


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flame-work")]


Submit = Callable[..., Awaitable[Any]]


@pytest.fixture(params=["run", "run_in_executor"])
def submit(request: pytest.FixtureRequest) -> Callable[[ElasticThreadPool], Submit]:
    """How a test hands the pool its calls: ``submit(pool)(fn, *args)``."""
    if request.param == "run":
        return lambda pool: pool.run
    return lambda pool: lambda fn, *args: asyncio.get_running_loop().run_in_executor(pool, fn, *args)


@pytest.fixture
async def pool() -> ElasticThreadPool:
    return ElasticThreadPool(asyncio.get_running_loop(), core=4, max_workers=64)


async def test_a_burst_of_trivial_calls_does_not_start_a_thread_per_call(
        pool: ElasticThreadPool, submit: Callable[[ElasticThreadPool], Submit]) -> None:
    call = submit(pool)
    try:
        results = await asyncio.gather(*(call(abs, -i) for i in range(500)))
        assert results == list(range(500))
        # A thread per call would be 64 (max_workers); the 4 core threads keep up, give or take
        # one started while the machine was too loaded to run them for a few milliseconds.
        assert len(workers()) < 16
    finally:
        pool.shutdown()


async def test_blocking_calls_still_run_side_by_side(
        pool: ElasticThreadPool, submit: Callable[[ElasticThreadPool], Submit]) -> None:
    call = submit(pool)
    meeting = threading.Barrier(20, timeout=30)  # more than the 4 core threads must be waiting at once
    try:
        arrivals = await asyncio.gather(*(call(meeting.wait) for _ in range(20)))
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


@pytest.mark.parametrize("from_thread", [False, True], ids=["from-the-loop", "from-another-thread"])
async def test_shutdown_cancels_queued_calls_and_lets_the_running_one_finish(
        submit: Callable[[ElasticThreadPool], Submit], from_thread: bool) -> None:
    loop = asyncio.get_running_loop()
    pool = ElasticThreadPool(loop, core=1, max_workers=1)
    call = submit(pool)
    started, release = threading.Event(), threading.Event()

    def blocked() -> bool:
        started.set()
        return release.wait(30)

    ran: list[int] = []
    running = asyncio.ensure_future(call(blocked))
    await loop.run_in_executor(None, started.wait, 30)
    queued = [asyncio.ensure_future(call(ran.append, i)) for i in range(3)]
    if from_thread:  # an asyncio future is set on its loop's thread, whoever shuts the pool down
        await loop.run_in_executor(None, lambda: pool.shutdown(wait=False, cancel_futures=True))
    else:
        pool.shutdown(wait=False, cancel_futures=True)
    for fut in queued:
        with pytest.raises(asyncio.CancelledError):
            await fut
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(abs, -1)
    release.set()
    assert await running is True
    await until(lambda: not workers(), what="the pool's thread to exit")
    assert ran == []


async def test_a_call_cancelled_before_a_thread_takes_it_never_runs() -> None:
    loop = asyncio.get_running_loop()
    pool = ElasticThreadPool(loop, core=1, max_workers=1)
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []
    try:
        running = pool.run(lambda: (started.set(), release.wait(30)))
        await loop.run_in_executor(None, started.wait, 30)
        queued = pool.run(ran.append, 1)
        queued.cancel()
        release.set()
        await running
        assert await pool.run(ran.append, 2) is None  # the thread went on to the next call
        assert ran == [2]
    finally:
        pool.shutdown()


async def test_a_call_that_raises_base_exception_reaches_the_caller_and_the_thread_goes_on(
        submit: Callable[[ElasticThreadPool], Submit]) -> None:
    class Interrupted(BaseException):
        pass

    def interrupted() -> None:
        raise Interrupted

    loop = asyncio.get_running_loop()
    pool = ElasticThreadPool(loop, core=1, max_workers=1)
    call = submit(pool)
    try:
        with pytest.raises(Interrupted):
            await call(interrupted)
        assert await call(abs, -2) == 2
        assert len(workers()) == 1
    finally:
        pool.shutdown()
