"""FLAME parity and Python ergonomics, on LocalBackend and ProcessBackend: keyword
arguments, timeouts that end remote work, casts without a time limit, map, retries,
messages to a placed child, tracked resources and the idle predicate."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import pathlib

import pytest

from flame_asgi import CallTimeout, FlameError, FlamePool, RunnerLost, release
from tests import remote
from tests.conftest import BackendFactory, until


def active(pool: FlamePool) -> int:
    return sum(r.active for r in pool.stats().runners)


# -- keyword arguments ------------------------------------------------------------------
async def test_keyword_arguments_reach_the_function(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    async with FlamePool("kwargs", backend=backend(), max_concurrency=4) as pool:
        assert await pool.call(remote.add, 1, b=2, c=3) == 6
        assert await pool.call(remote.aadd, 1, b=41) == 42
        assert await pool.call(remote.add, 1, timeout=10, b=1) == 2  # option names are the pool's
        assert [x async for x in pool.stream(remote.kw_count, 10, step=3)] == [0, 3, 6, 9]
        child = await pool.place_child(remote.add, 2, c=5)
        assert await child == 7
        done = tmp_path / "cast"
        pool.cast(remote.sleep_then_touch, 0.0, path=str(done))
        await until(done.exists, what="the cast with keyword arguments")
        with pytest.raises(TypeError, match="unexpected keyword argument 'd'"):
            await pool.call(remote.add, 1, d=2)  # the remote TypeError, re-raised as itself


# -- timeouts ---------------------------------------------------------------------------
async def test_a_timeout_ends_unlinked_work_too(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    late = tmp_path / "late"
    async with FlamePool("timeout", backend=backend(), max_concurrency=2) as pool:
        with pytest.raises(CallTimeout, match=r"sleep_then_touch.*cancelled on the runner"):
            await pool.call(remote.sleep_then_touch, 1.0, str(late), timeout=0.3, link=False)
        await until(lambda: active(pool) == 0, what="the slot freed by the runner's cancel")
        await asyncio.sleep(1.2)
        assert not late.exists(), "the timed-out link=False call ran on"
        # A stream's timeout ends its generator too.
        stream = pool.stream(remote.sleep_then_touch, 1.0, str(late), timeout=0.3, link=False)
        with pytest.raises(CallTimeout, match="cancelled on the runner"):
            await anext(stream)
        await until(lambda: active(pool) == 0, what="the stream's slot")


async def test_casts_run_to_completion_and_failures_are_logged_with_their_reason(
        backend: BackendFactory, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    done = tmp_path / "done"
    caplog.set_level(logging.ERROR, logger="flame_asgi.pool")
    async with FlamePool("casts", backend=backend(), max_concurrency=4, timeout=0.2) as pool:
        pool.cast(remote.sleep_then_touch, 0.6, str(done))  # 3x the pool's call timeout
        await until(done.exists, what="a cast longer than the pool's timeout to finish")
        pool.cast(remote.sleep_then_touch, 5.0, str(tmp_path / "never"), timeout=0.2)
        pool.cast(remote.raise_value_error)
        await until(lambda: len(caplog.records) >= 2, what="two failed casts logged")
        await until(lambda: active(pool) == 0, what="the timed-out cast's slot")
    messages = sorted(r.getMessage() for r in caplog.records)
    assert any("cast of raise_value_error() failed: ValueError: remote boom" in m for m in messages), messages
    assert any("cast of sleep_then_touch() failed: CallTimeout: sleep_then_touch() did not finish within 0.2 s"
               in m for m in messages), messages
    assert not (tmp_path / "never").exists()


# -- map --------------------------------------------------------------------------------
async def test_map_keeps_input_order_or_yields_as_finished(backend: BackendFactory) -> None:
    async with FlamePool("map", backend=backend(), max=2, max_concurrency=4) as pool:
        assert [r async for r in pool.map(remote.square, range(20))] == [i * i for i in range(20)]

        async def numbers():  # an async iterable works too
            for i in range(5):
                yield i

        assert [r async for r in pool.map(remote.square, numbers())] == [0, 1, 4, 9, 16]
        delays = [1.0, 0.0, 0.5]
        fn = functools.partial(remote.slow_square, delay=0.0)
        assert [r async for r in pool.map(fn, [])] == []
        got = [r async for r in pool.map(_delayed, list(zip(range(3), delays, strict=True)), ordered=False)]
        assert sorted(got) == [0, 1, 4]
        assert got[0] == 1  # the one without a delay came first


async def _delayed(pair: tuple[int, float]) -> int:
    value, delay = pair
    return await remote.slow_square(value, delay)


async def test_map_bounds_calls_in_flight(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    started.mkdir()
    async with FlamePool("bounded", backend=backend(), max=1, max_concurrency=10) as pool:
        results = pool.map(functools.partial(remote.gated_square, gate=str(gate), started_dir=str(started)),
                           range(10), max_in_flight=3)
        first = asyncio.ensure_future(anext(results))
        await until(lambda: len(os.listdir(started)) == 3, what="three calls started")
        await asyncio.sleep(0.3)
        assert len(os.listdir(started)) == 3 and active(pool) == 3  # the rest wait for room
        gate.touch()
        assert await first == 0
        assert [r async for r in results] == [i * i for i in range(1, 10)]


async def test_map_first_error_cancels_the_rest_unless_asked(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    started.mkdir()
    async with FlamePool("errors", backend=backend(), max=1, max_concurrency=10) as pool:
        slow = functools.partial(remote.gated_square, gate=str(gate), started_dir=str(started))

        with pytest.raises(ValueError, match="bad item 3"):
            async for _ in pool.map(functools.partial(remote.fail_on, bad=3), range(6), ordered=False):
                pass
        # The gated calls never finish by themselves: the error must cancel them.
        with pytest.raises(ValueError, match="bad item 0"):
            async for _ in pool.map(_fail_first_or_hold(slow), range(4)):
                pass
        await until(lambda: active(pool) == 0, what="the rest of the map cancelled")
        got = [r async for r in pool.map(functools.partial(remote.fail_on, bad=2), range(4), return_exceptions=True)]
        assert got[:2] == [0, 1] and isinstance(got[2], ValueError) and got[3] == 3
        # Leaving early with `async with` cancels what still runs.
        async with pool.map(functools.partial(_quick_zero, slow=slow), range(4)) as results:
            async for first in results:
                assert first == 0
                break
            assert active(pool) == 3
        await until(lambda: active(pool) == 0, what="the abandoned map cancelled")


def _fail_first_or_hold(slow: functools.partial[object]) -> functools.partial[object]:
    return functools.partial(_fail_zero, slow=slow)


async def _quick_zero(value: int, slow: functools.partial[object]) -> object:
    return 0 if value == 0 else await slow(value)  # type: ignore[misc]


async def _fail_zero(value: int, slow: functools.partial[object]) -> object:
    if value == 0:
        await asyncio.sleep(0.2)  # the others have started by now
        raise ValueError("bad item 0")
    return await slow(value)  # type: ignore[misc]


# -- retries ----------------------------------------------------------------------------
async def test_retries_rerun_a_call_whose_runner_was_lost(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    async with FlamePool("retry", backend=backend(), max=1) as pool:
        with pytest.raises(RunnerLost):
            await pool.call(remote.die_once, str(tmp_path / "a"))  # never by default
        assert await pool.call(remote.die_once, str(tmp_path / "b"), retries=2) == "survived"
        attempts = tmp_path / "attempts"
        with pytest.raises(ValueError, match="not retried"):
            await pool.call(remote.attempt_then_raise, str(attempts), retries=3)
        assert attempts.read_text() == "x"  # the user's own exception: one attempt only
        own = tmp_path / "own-runner-lost"
        with pytest.raises(RunnerLost, match="another pool"):
            await pool.call(remote.raise_runner_lost, str(own), retries=3)
        assert own.read_text() == "x"  # a RunnerLost the function raised is its own error too
    async with FlamePool("retry-default", backend=backend(), max=1, retries=1) as pool:
        assert await pool.call(remote.die_once, str(tmp_path / "c")) == "survived"
        done = tmp_path / "cast-marker"
        pool.cast(remote.die_once, str(done))  # casts retry too
        await until(lambda: done.exists() and active(pool) == 0 and pool.stats().runners, timeout=20,
                    what="the cast's retry on a new runner")
    with pytest.raises(ValueError, match="retries must be 0 or more"):
        FlamePool("bad", retries=-1)


# -- messages to a placed child ---------------------------------------------------------
@pytest.mark.parametrize("fn", [remote.steer, remote.steer_sync], ids=["async", "sync"])
async def test_messages_reach_a_placed_child_in_order(backend: BackendFactory, fn: object) -> None:
    async with FlamePool("steer", backend=backend(), max_concurrency=2) as pool:
        handle = await pool.place_child(fn, 40)  # type: ignore[arg-type]
        for i in range(40):  # more than the window: send waits for the child to take them
            await handle.send({"set": i})
        events = [e async for e in handle]
        assert await handle == [{"set": i} for i in range(40)]
        assert events == [("got", {"set": i}) for i in range(40)]
        with pytest.raises(FlameError, match="has ended"):
            await handle.send("too late")
        assert await (await pool.place_child(remote.poll_once)) == "nothing yet"
        assert "only inside a child" in await pool.call(remote.receive_outside_child)


async def test_a_child_that_never_reads_holds_back_the_sender(backend: BackendFactory,
                                                               tmp_path: pathlib.Path) -> None:
    gate = tmp_path / "gate"
    async with FlamePool("deaf", backend=backend(), max_concurrency=2) as pool:
        handle = await pool.place_child(remote.hold, str(gate))
        for i in range(16):
            await handle.send(i)
        blocked = asyncio.ensure_future(handle.send("one too many"))
        await asyncio.sleep(0.3)
        assert not blocked.done()  # back-pressure: the child has 16 untaken messages
        handle.cancel()
        with pytest.raises(FlameError, match="has ended"):
            await blocked
        with pytest.raises(asyncio.CancelledError):
            await handle


# -- tracked resources ------------------------------------------------------------------
async def test_tracked_remote_bytes_keep_a_single_use_runner_until_read(backend: BackendFactory) -> None:
    async with FlamePool("track-bytes", backend=backend(), single_use=True, idle_shutdown_after=0.1) as pool:
        result = await pool.call(remote.make_bytes, 3 << 20, track_resources=True)
        await asyncio.sleep(0.5)
        assert len(pool.stats().runners) == 1  # spent, but its RemoteBytes is unread
        assert len(await result["data"].read()) == 3 << 20
        await until(lambda: not pool.stats().runners, what="the runner to stop once the bytes were read")


async def test_tracked_objects_are_released_explicitly_or_when_dropped(backend: BackendFactory,
                                                                      tmp_path: pathlib.Path) -> None:
    async with FlamePool("track-obj", backend=backend(), single_use=True, max=2) as pool:
        scratch = await pool.call(remote.make_scratch, str(tmp_path), "one", track_resources=True)
        await asyncio.sleep(0.5)
        assert pathlib.Path(scratch.path).exists() and len(pool.stats().runners) == 1
        release(scratch)
        await until(lambda: not pathlib.Path(scratch.path).exists(), what="__flame_release__ on the runner")
        await until(lambda: not pool.stats().runners, what="the released runner to stop")
        release(scratch)  # twice: nothing

        other = await pool.call(remote.make_scratch, str(tmp_path), "two", track_resources=True)
        path = other.path
        del other
        gc.collect()
        await until(lambda: not pathlib.Path(path).exists(), what="a dropped object's release")
        await until(lambda: not pool.stats().runners, what="the runner of a dropped object to stop")


async def test_tracked_resources_are_released_when_the_pool_closes(backend: BackendFactory,
                                                                  tmp_path: pathlib.Path) -> None:
    async with FlamePool("track-close", backend=backend(), shutdown_timeout=0.5) as pool:
        scratch = await pool.call(remote.make_scratch, str(tmp_path), "kept", track_resources=True)
    assert not pathlib.Path(scratch.path).exists()  # the runner released it as it stopped


# -- idle predicate ---------------------------------------------------------------------
async def test_idle_predicate_decides_on_the_runner(backend: BackendFactory, tmp_path: pathlib.Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    flag = tmp_path / "may-stop"
    predicate = functools.partial(remote.file_exists, str(flag))
    async with FlamePool("predicate", backend=backend(), idle_shutdown_after=(0.1, predicate)) as pool:
        first = await pool.call(remote.runner_id)
        await asyncio.sleep(1.0)
        assert [r.id for r in pool.stats().runners] == [first]  # idle, but the predicate says no
        assert await pool.call(remote.runner_id) == first  # and it still takes work
        flag.touch()
        await until(lambda: not pool.stats().runners, what="the runner to stop once the predicate agrees")
    caplog.set_level(logging.WARNING, logger="flame_asgi.pool")
    async with FlamePool("broken", backend=backend(), idle_shutdown_after=(0.1, remote.broken_predicate)) as pool:
        await pool.call(remote.works)
        await until(lambda: not pool.stats().runners, what="a runner with a broken predicate to stop")
    assert any("predicate failed" in r.getMessage() and "predicate broke" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError, match=r"idle_shutdown_after=\(seconds, predicate\)"):
        FlamePool("bad", idle_shutdown_after=(1.0, "not callable"))


async def test_a_lease_takes_keyword_arguments_maps_and_tracks(backend: BackendFactory,
                                                              tmp_path: pathlib.Path) -> None:
    async with FlamePool("lease-parity", backend=backend(), max=2, max_concurrency=4) as pool:
        async with pool.runner() as runner:
            assert await runner.call(remote.add, 1, b=2) == 3
            assert [r async for r in runner.map(remote.square, range(5))] == [0, 1, 4, 9, 16]
            scratch = await runner.call(remote.make_scratch, str(tmp_path), "leased", track_resources=True)
            handle = await runner.place_child(remote.steer, 1)
            await handle.send("hi")
            assert await handle == ["hi"]
        assert pathlib.Path(scratch.path).exists()  # the lease ended; the tracked object still holds
        release(scratch)
        await until(lambda: not pathlib.Path(scratch.path).exists(), what="the leased runner's object released")
