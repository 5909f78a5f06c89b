"""pool.runner() / FlameRunner: a lease on one runner slot, on both backends."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from flame_asgi import CallTimeout, FlamePool, PoolClosed, RunnerLost
from tests import remote
from tests.conftest import BackendFactory, until


async def test_every_call_kind_of_a_lease_runs_on_its_runner(backend: BackendFactory) -> None:
    async with FlamePool("lease", backend=backend(), max=3, max_concurrency=4) as pool:
        async with pool.runner() as runner:
            assert runner.id.startswith("lease-")
            assert await runner.call(remote.runner_id) == runner.id
            assert [x async for x in runner.stream(remote.count_up, 3)] == [0, 1, 2]
            child = await runner.place_child(remote.runner_id)
            assert await child == runner.id
            many = await asyncio.gather(*(runner.call(remote.runner_id) for _ in range(8)))
            assert set(many) == {runner.id}  # concurrent calls too, however many queue
            assert pool.stats().runners[0].active == 1  # the lease holds its slot between calls
        await until(lambda: all(r.active == 0 for r in pool.stats().runners), what="the lease's slot freed")
        with pytest.raises(PoolClosed, match=r"lease .* has ended"):
            await runner.call(remote.square, 2)


async def test_concurrent_calls_on_a_lease_run_side_by_side_when_the_runner_has_room(
        backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    async with FlamePool("lease", backend=backend(), max=1, max_concurrency=3) as pool:
        async with pool.runner() as runner:
            got = await asyncio.gather(*(runner.call(remote.meet, str(tmp_path), i, 3) for i in range(3)))
            assert sorted(got) == [0, 1, 2]


async def test_a_lease_waits_for_its_own_slot_when_the_runner_is_full(backend: BackendFactory,
                                                                       tmp_path: pathlib.Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    async with FlamePool("lease", backend=backend(), max=1, max_concurrency=1) as pool:
        async with pool.runner() as runner:
            first = asyncio.ensure_future(runner.call(remote.hold, str(gate), str(started)))
            await until(started.exists, what="the first call to start")
            with pytest.raises(CallTimeout, match="no free slot on leased runner"):
                await runner.call(remote.square, 2, timeout=0.3)
            second = asyncio.ensure_future(runner.call(remote.square, 3))
            gate.touch()
            assert await first == "held"
            assert await second == 9


async def test_a_lease_keeps_its_runner_past_idle_shutdown_and_single_use(backend: BackendFactory) -> None:
    async with FlamePool("lease", backend=backend(), max=1, single_use=True, idle_shutdown_after=0.05) as pool:
        async with pool.runner() as runner:
            first = await runner.call(remote.pid)
            await asyncio.sleep(0.3)  # far past idle_shutdown_after
            assert await runner.call(remote.pid) == first  # the same runner, still there
            assert len(pool.stats().runners) == 1
        await until(lambda: not pool.stats().runners, what="the single-use runner to stop after its lease")


async def test_a_lease_whose_runner_dies_raises_runner_lost(backend: BackendFactory) -> None:
    async with FlamePool("lease", backend=backend(), max=2) as pool:
        async with pool.runner() as runner:
            with pytest.raises(RunnerLost):
                await runner.call(remote.die)
            with pytest.raises(RunnerLost, match="is gone"):
                await runner.call(remote.square, 2)
        assert await pool.call(remote.square, 3) == 9  # the pool goes on with a new runner


async def test_a_lease_waits_for_a_slot_in_the_pool_and_says_so(backend: BackendFactory,
                                                                 tmp_path: pathlib.Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    async with FlamePool("lease", backend=backend(), max=1, max_concurrency=1) as pool:
        busy = asyncio.ensure_future(pool.call(remote.hold, str(gate), str(started)))
        await until(started.exists, what="the pool's only slot to be taken")
        with pytest.raises(CallTimeout, match=r"no free runner slot within 0\.2 s"):
            async with pool.runner(timeout=0.2):
                pass
        gate.touch()
        await busy


async def test_cast_on_a_lease(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    mark = tmp_path / "cast"
    async with FlamePool("lease", backend=backend(), max=2) as pool:
        async with pool.runner() as runner:
            runner.cast(remote.touch, str(mark))
            await until(mark.exists, what="the cast to run")
            assert repr(runner).startswith(f"<FlameRunner {runner.id} of pool 'lease' open")
