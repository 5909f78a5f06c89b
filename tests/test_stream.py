"""stream(), report()/on_progress and place_child: order, back-pressure, slots."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import pytest

from flame_asgi import FlamePool, RunnerLost
from flame_asgi._wire.protocol import CALL_WINDOW as WINDOW
from tests import remote
from tests.conftest import BackendFactory, until


def active(pool: FlamePool) -> int:
    return sum(r.active for r in pool.stats().runners)


async def test_stream_sync_and_async_generators(backend: BackendFactory) -> None:
    async with FlamePool("stream", backend=backend()) as pool:
        assert [x async for x in pool.stream(remote.count_up, 50)] == list(range(50))
        assert [x async for x in pool.stream(remote.acount_up, 50)] == list(range(50))
        assert [x async for x in pool.stream(lambda: [1, 2, 3])] == [1, 2, 3]  # any iterable
        assert active(pool) == 0


async def test_stream_applies_back_pressure(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "produced"
    async with FlamePool("pressure", backend=backend()) as pool:
        stream = pool.stream(remote.produce_logged, 10_000, str(log))
        assert await stream.__anext__() == 0
        await asyncio.sleep(0.5)  # a generator without back-pressure would finish all 10,000 by now
        produced = int(log.read_text())
        assert produced <= WINDOW + 2  # the window, plus the item in hand
        await stream.aclose()
        await until(lambda: active(pool) == 0, what="the slot to be freed")


async def test_breaking_out_of_a_stream_frees_the_slot(backend: BackendFactory) -> None:
    async with FlamePool("break", backend=backend()) as pool:
        async with pool.stream(remote.count_up, 1000) as stream:
            async for item in stream:
                if item == 3:
                    break
        await until(lambda: active(pool) == 0)
        assert await pool.call(remote.works) == "works"


async def test_stream_error_and_runner_death(backend: BackendFactory) -> None:
    def gen_then_raise() -> Any:
        yield 1
        raise KeyError("late")

    async with FlamePool("stream-err", backend=backend()) as pool:
        seen = []
        with pytest.raises(KeyError, match="late"):
            async for item in pool.stream(gen_then_raise):
                seen.append(item)
        assert seen == [1]

        def gen_then_die() -> Any:
            yield 1
            remote.die()
            yield 2

        with pytest.raises(RunnerLost):
            async for _ in pool.stream(gen_then_die):
                pass


async def test_progress_events_arrive_in_order_before_the_result(backend: BackendFactory) -> None:
    async with FlamePool("progress", backend=backend()) as pool:
        events: list[Any] = []
        assert await pool.call(remote.report_steps, 200, on_progress=events.append) == "reported"
        assert events == [{"step": i} for i in range(200)]

        async def slow_consumer(event: Any) -> None:
            await asyncio.sleep(0)
            events.append(event)

        events.clear()
        assert await pool.call(remote.areport_steps, 100, on_progress=slow_consumer) == "reported"
        assert events == [{"step": i} for i in range(100)]
        # Without a listener, report() is a no-op and costs nothing on the wire.
        assert await pool.call(remote.report_steps, 10) == "reported"


async def test_a_fast_reporter_waits_for_a_slow_consumer(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "reported"
    release = asyncio.Event()
    received: list[Any] = []

    async def stuck(event: Any) -> None:
        received.append(event)
        await release.wait()

    async with FlamePool("report-pressure", backend=backend()) as pool:
        call = asyncio.create_task(pool.call(remote.report_logged, 5000, str(log), on_progress=stuck))
        await until(lambda: log.exists())
        await asyncio.sleep(0.5)
        assert int(log.read_text()) <= WINDOW + 2  # the reporter is held back at the window
        release.set()
        assert await call == "reported"
        assert received == list(range(5000))


async def test_report_outside_a_runner_is_a_noop(backend: BackendFactory) -> None:
    from flame_asgi import report

    await asyncio.wait_for(report("nobody listens"), 0.1)  # awaitable, done at once
    report("nobody listens")  # and fine not awaited
    # Inside a call without on_progress it is a no-op too: nothing is sent, nothing blocks.
    async with FlamePool("noop", backend=backend()) as pool:
        assert await pool.call(remote.report_steps, 10_000, timeout=10) == "reported"


async def test_place_child_holds_a_slot_and_buffers_events(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    gate = tmp_path / "gate"

    async def child(gate: str) -> str:
        from flame_asgi import report

        for i in range(5):
            await report(i)
        await remote.hold(gate)
        return "child done"

    async with FlamePool("child", backend=backend(), idle_shutdown_after=0.2) as pool:
        handle = await pool.place_child(child, str(gate))
        await asyncio.sleep(0.6)
        assert active(pool) == 1 and len(pool.stats().runners) == 1  # not idled while it lives
        gate.touch()
        assert await handle == "child done"
        assert [e async for e in handle] == [0, 1, 2, 3, 4]  # buffered from placement on
        await until(lambda: not pool.stats().runners, what="the runner to idle after the child")


async def test_child_cancel_frees_the_slot_once_stopped(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    done = tmp_path / "done"
    async with FlamePool("child-cancel", backend=backend()) as pool:
        handle = await pool.place_child(remote.sleep_then_touch, 0.5, str(done))
        assert active(pool) == 1
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        await until(lambda: active(pool) == 0)
        await asyncio.sleep(0.8)
        assert not done.exists()  # stopped on the runner, not just forgotten here


async def test_child_runner_death_reaches_the_handle(backend: BackendFactory) -> None:
    async with FlamePool("child-death", backend=backend()) as pool:
        handle = await pool.place_child(remote.die)
        with pytest.raises(RunnerLost):
            await handle
        assert [e async for e in handle] == []


async def test_linked_child_stops_when_its_caller_ends(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    gate = str(tmp_path / "never")
    async with FlamePool("child-link", backend=backend(), max_concurrency=4) as pool:
        handles = []

        async def caller(link: bool) -> None:
            handles.append(await pool.place_child(remote.hold, gate, link=link))

        await asyncio.create_task(caller(True))
        await until(lambda: handles[0].done(), what="the linked child to stop with its caller")
        await asyncio.create_task(caller(False))
        await asyncio.sleep(0.3)
        assert not handles[1].done() and active(pool) == 1  # the unlinked child lives on
        handles[1].cancel()
        await until(lambda: active(pool) == 0)


async def test_stream_progress_reaches_the_consumer_in_order(backend: BackendFactory) -> None:
    seen: list[Any] = []
    async with FlamePool("stream-progress", backend=backend()) as pool:
        async for item in pool.stream(remote.count_with_progress, 3, on_progress=seen.append):
            seen.append(item)
    assert seen == ["making 0", 0, "making 1", 1, "making 2", 2]


def test_streams_and_children_reach_their_pool_only_through_its_contracts() -> None:
    # The pool may change how it runs work: a stream or a child handle sees only the
    # Placement and Starter contracts and the RemoteCall of its channel, never the pool.
    from tests.test_layers import graph

    imports = graph()
    for module in ("flame_asgi._pool.stream", "flame_asgi._pool.child"):
        pool_parts = {m for m, _ in imports[module] if m.startswith("flame_asgi._pool.")}
        assert pool_parts <= {"flame_asgi._pool.placement"}, module
