"""The Elixir runner scenarios (test/runner_test.exs) and what a call does on a runner."""

from __future__ import annotations

import asyncio
import pathlib
import sys
import time
from typing import Any

import pytest

from flame_asgi import Backend, BootError, CallTimeout, FlamePool, PoolStats, RemoteError, SerializationError
from flame_asgi.backends import RunnerHandle, RunnerSpec
from tests import remote
from tests.conftest import BackendFactory, until
from tests.idle import reapers_looked_past


# -- run on runners (by reference: this module is importable there) -------------------------
async def sleep_noting_cancellation(folder: str) -> str:
    """Mark ``started``; sleep (far longer than any test); mark ``cancelled`` if cancelled."""
    pathlib.Path(folder, "started").touch()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        pathlib.Path(folder, "cancelled").touch()
        raise
    pathlib.Path(folder, "finished").touch()
    return "slept"


def spin_noting_interruption(folder: str) -> str:
    """Mark ``started``; a pure-Python busy loop (interruptible only between bytecodes) that
    writes a tick every 50 ms; mark ``interrupted`` if something is raised into it."""
    pathlib.Path(folder, "started").touch()
    tick = pathlib.Path(folder, "tick")
    end = time.monotonic() + 60
    count, next_tick = 0, 0.0
    try:
        while (now := time.monotonic()) < end:
            if now >= next_tick:
                count, next_tick = count + 1, now + 0.05
                tick.write_text(str(count))
    except BaseException:
        pathlib.Path(folder, "interrupted").touch()
        raise
    pathlib.Path(folder, "finished").touch()
    return "spun"


# CPython 3.13.0 raises an asynchronous exception past the function's own except/finally
# (python/cpython#139622): the loop stops, but its cleanup code does not run there.
ASYNC_EXC_RUNS_HANDLERS = sys.version_info[:3] != (3, 13, 0)


async def stops_ticking(folder: pathlib.Path, quiet: float = 0.5, within: float = 10.0) -> bool:
    """True once the busy loop's tick has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + within
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = (folder / "tick").read_text() if (folder / "tick").exists() else None
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
        await asyncio.sleep(0.05)
    return False


async def gated_touch(gate: str, done: str) -> str:
    await remote.hold(gate)
    return remote.touch(done)


async def test_single_use_runner_stops_after_one_call(backend: BackendFactory) -> None:
    shrinks: list[str] = []
    async with FlamePool("single", backend=backend(), single_use=True, max=2,
                         on_shrink=lambda m: shrinks.append(m["reason"])) as pool:
        first = await pool.call(remote.runner_id)
        await until(lambda: shrinks == ["single_use"], what="the single-use runner to stop")
        second = await pool.call(remote.runner_id)
        assert first != second


async def test_single_use_raise_reaches_caller_then_runner_stops(backend: BackendFactory) -> None:
    shrinks: list[str] = []
    async with FlamePool("single-raise", backend=backend(), single_use=True,
                         on_shrink=lambda m: shrinks.append(m["reason"])) as pool:
        with pytest.raises(ValueError, match="remote boom") as raised:
            await pool.call(remote.raise_value_error)
        assert any("Remote traceback" in note for note in raised.value.__notes__)
        await until(lambda: shrinks == ["single_use"] and not pool.stats().runners)


async def test_multi_use_runner_survives_a_raise(backend: BackendFactory) -> None:
    async with FlamePool("multi-raise", backend=backend()) as pool:
        before = await pool.call(remote.runner_id)
        with pytest.raises(ValueError):
            await pool.call(remote.raise_value_error)
        assert await pool.call(remote.runner_id) == before


async def test_execution_timeout_single_use_kills_work_and_runner(backend: BackendFactory,
                                                                  tmp_path: pathlib.Path) -> None:
    shrinks: list[str] = []
    async with FlamePool("single-timeout", backend=backend(), single_use=True, min=1,
                         on_shrink=lambda m: shrinks.append(m["reason"])) as pool:
        with pytest.raises(CallTimeout, match=r"did not finish within 0\.5 s; it was cancelled on the runner"):
            await pool.call(sleep_noting_cancellation, str(tmp_path), timeout=0.5)
        await until(lambda: shrinks == ["single_use"])
    # The runner is gone; the remote sleep was cancelled, not left to finish (or, on a
    # machine too loaded to start it within 0.5 s, never began).
    assert (tmp_path / "cancelled").exists() == (tmp_path / "started").exists()
    assert not (tmp_path / "finished").exists()


async def test_execution_timeout_multi_use_runner_survives(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    async with FlamePool("multi-timeout", backend=backend(), min=1) as pool:
        rid = await pool.call(remote.runner_id)
        with pytest.raises(CallTimeout):
            await pool.call(remote.hold, str(tmp_path / "never"), timeout=0.1)
        assert await pool.call(remote.works) == "works"
        assert await pool.call(remote.runner_id) == rid


async def test_unlinked_work_outlives_its_caller_but_not_its_timeout(backend: BackendFactory,
                                                                    tmp_path: pathlib.Path) -> None:
    gate, finished = tmp_path / "gate", tmp_path / "finished"
    async with FlamePool("unlinked-timeout", backend=backend(), min=1) as pool:
        # FLAME: a timeout terminates the function on the runner, linked or not.
        with pytest.raises(CallTimeout, match="cancelled on the runner"):
            # Its own gate, never opened: the runner may still be importing this module
            # when the cancel arrives, and must not find the gate open by then.
            await pool.call(gated_touch, str(tmp_path / "closed"), str(tmp_path / "timed-out"), timeout=0.05,
                            link=False)
        await until(lambda: sum(r.active for r in pool.stats().runners) == 0, what="the timed-out work's slot")
        # link=False only decides whether the work outlives a caller that goes away.
        caller = asyncio.create_task(pool.call(gated_touch, str(gate), str(finished), link=False))
        await until(lambda: sum(r.active for r in pool.stats().runners) == 1, what="the unlinked call to start")
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert sum(r.active for r in pool.stats().runners) == 1  # the slot stays held for it
        gate.touch()
        await until(lambda: finished.exists(), what="the unlinked work to finish")
        await until(lambda: sum(r.active for r in pool.stats().runners) == 0)
        assert not (tmp_path / "timed-out").exists()


async def test_cancelled_caller_cancels_linked_work(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    async with FlamePool("cancel", backend=backend()) as pool:
        task = asyncio.create_task(pool.call(sleep_noting_cancellation, str(tmp_path)))
        await until(lambda: (tmp_path / "started").exists(), what="the remote work to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sum(r.active for r in pool.stats().runners) == 0  # the slot is freed at once
        await until(lambda: (tmp_path / "cancelled").exists(), what="the remote work to be cancelled")
        assert not (tmp_path / "finished").exists()


async def test_cancelled_sync_call_frees_its_slot(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    async with FlamePool("cancel-sync", backend=backend()) as pool:
        task = asyncio.create_task(pool.call(spin_noting_interruption, str(tmp_path)))
        await until(lambda: (tmp_path / "started").exists(), what="the busy loop to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sum(r.active for r in pool.stats().runners) == 0
        # The busy loop was interrupted between bytecodes, not left to spin.
        assert await stops_ticking(tmp_path), "the busy loop kept spinning after its call was cancelled"
        if ASYNC_EXC_RUNS_HANDLERS:
            await until(lambda: (tmp_path / "interrupted").exists(), what="the busy loop's own handler to run")
        assert not (tmp_path / "finished").exists()
        assert await pool.call(remote.works) == "works"


async def test_idle_shutdown_without_and_with_a_prior_call(backend: BackendFactory) -> None:
    async with FlamePool("min-idle", backend=backend(), min=1, min_idle_shutdown_after=0.3) as pool:
        assert len(pool.stats().runners) == 1
        await until(lambda: not pool.stats().runners, what="the min runner to idle down")
        assert await pool.call(remote.works) == "works"
        await until(lambda: not pool.stats().runners, what="the runner to idle down after a call")


async def test_idle_none_keeps_runners(backend: BackendFactory) -> None:
    # min_idle_shutdown_after=0.1 makes the reaper look every 20 ms; this runner is not a
    # min runner, so it follows idle_shutdown_after=None: it must stay.
    async with FlamePool("keep", backend=backend(), idle_shutdown_after=None, min_idle_shutdown_after=0.1) as pool:
        rid = await pool.call(remote.runner_id)
        await reapers_looked_past(0.1)  # this pool's reaper has seen it idle past 0.1 s
        assert len(pool.stats().runners) == 1
        assert await pool.call(remote.runner_id) == rid


class RefusingBackend(Backend):
    """A backend whose infrastructure says no (bad credentials, unknown host)."""

    name = "refusing"

    async def boot(self, spec: RunnerSpec) -> RunnerHandle:
        raise BootError("401 Unauthorized: bad API token", reason="bad credentials")


async def test_backend_refusal_reaches_the_caller_not_a_timeout() -> None:
    async with FlamePool("refused", backend=RefusingBackend()) as pool:
        with pytest.raises(BootError, match="bad API token") as raised:
            await pool.call(remote.works, timeout=0.5)
        assert raised.value.reason == "bad credentials"


async def test_unpicklable_closure_names_the_object_before_sending() -> None:
    import threading

    lock = threading.Lock()

    def uses_lock() -> bool:
        return lock.locked()

    async with FlamePool("pickle") as pool:
        with pytest.raises(SerializationError, match=r"closure variable 'lock' of .*uses_lock.*_thread\.lock"):
            await pool.call(uses_lock)
        assert pool.stats() == PoolStats(runners=[], booting=0, waiting=0)  # failed before anything started
        with pytest.raises(SerializationError, match="argument 1 of the call to square"):
            await pool.call(remote.square, 3, lock)  # type: ignore[call-arg, arg-type]


async def test_unpicklable_result_is_an_error_not_a_hang(backend: BackendFactory) -> None:
    async with FlamePool("result", backend=backend()) as pool:
        with pytest.raises(SerializationError, match="the result of"):
            await pool.call(lambda: __import__("threading").Lock())


async def test_unrebuildable_remote_exception_becomes_remote_error(backend: BackendFactory) -> None:
    def raise_local_type() -> None:
        class Weird(Exception):
            def __init__(self, a: Any, b: Any) -> None:
                super().__init__(a)

        raise Weird(1, 2)

    async with FlamePool("remote-error", backend=backend()) as pool:
        with pytest.raises(RemoteError) as raised:
            await pool.call(raise_local_type)
        assert "Weird" in raised.value.remote_type
        assert "raise Weird(1, 2)" in raised.value.remote_traceback


async def test_async_and_sync_functions_and_closures(backend: BackendFactory) -> None:
    factor = 3

    async def scaled(x: int) -> int:
        await asyncio.sleep(0)
        return x * factor

    async with FlamePool("kinds", backend=backend()) as pool:
        assert await pool.call(remote.square, 4) == 16
        assert await pool.call(scaled, 5) == 15
        assert await pool.call(lambda: factor * 2) == 6


async def test_a_runner_built_from_other_code_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from flame_asgi import ProcessBackend, VersionSkew

    monkeypatch.setenv("FLAME_CODE_VERSION", "build-2")
    backend = ProcessBackend(env={"FLAME_CODE_VERSION": "build-1"})  # as if deployed from older code
    boots: list[str] = []
    async with FlamePool("skew", backend=backend, boot_timeout=20,
                         on_grow_start=lambda meta: boots.append(meta["runner_id"])) as pool:
        with pytest.raises(VersionSkew, match="runs code version build-1 but its parent runs build-2"):
            await pool.call(remote.works)
        assert len(boots) == 1 and pool.stats().booting == 0  # refused at once, not retried until the deadline


async def test_blocking_sync_calls_run_side_by_side(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    # 16 sync calls that each block until all 16 have started: more than the runner's
    # core worker threads, so this passes only if blocked calls get threads of their own.
    async with FlamePool("blocking", backend=backend(), max_concurrency=16) as pool:
        results = await asyncio.gather(*(pool.call(remote.meet, str(tmp_path), i, 16) for i in range(16)))
    assert sorted(results) == list(range(16))
