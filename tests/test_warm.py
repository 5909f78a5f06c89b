"""``warm=N`` on real ProcessBackend runners: a call boots the spares beside its own runner, a
burst runs on runners already up, spares are topped up as calls take them, the pool shows
them as their own state, and a quiet pool lets them idle away."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flame_asgi import FlamePool, LocalBackend, ProcessBackend, subscribe
from tests import remote
from tests.conftest import until


async def test_a_burst_runs_on_spares_booted_before_it() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    unsubscribe = subscribe(lambda name, fields: events.append((name, fields)))
    try:
        async with FlamePool("warm", backend=ProcessBackend(), max=6, max_concurrency=1, warm=3,
                             idle_shutdown_after=None) as pool:
            assert pool.warm == 3 and pool.stats().runners == []  # a pool that had no call boots none
            await pool.call(remote.pid)
            await until(lambda: not pool.stats().booting, 30.0, "three warm spares beside the first runner")
            assert pool.stats().warm == 3
            assert len(pool.stats().runners) == 4
            booted = {r.id for r in pool.stats().runners}
            boots = [f for name, f in events if name == "runner.boot.start"]
            assert sorted(f["why"] for f in boots) == ["demand", "warm", "warm", "warm"]
            # Three calls at once: each finds a runner up, none waits for a boot of its own.
            burst = [asyncio.create_task(pool.call(remote.runner_id_after, 0.3)) for _ in range(3)]
            ran_on = set(await asyncio.gather(*burst))
            assert ran_on <= booted, "a call of the burst waited for a runner booted after it"
            # The spares it took are topped up, never past max=6.
            await until(lambda: pool.stats().warm >= 2 and not pool.stats().booting, 30.0, "spares topped up")
            assert len(pool.stats().runners) == 6
            whys = [f["why"] for name, f in events if name == "runner.boot.start"]
            assert whys.count("demand") == 1 and whys.count("warm") == 5
    finally:
        unsubscribe()


async def test_a_quiet_pool_lets_its_spares_idle_away() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    unsubscribe = subscribe(lambda name, fields: events.append((name, fields)))
    try:
        async with FlamePool("quiet", backend=LocalBackend(), max=4, warm=2, idle_shutdown_after=0.3) as pool:
            await pool.call(remote.square, 2)
            await until(lambda: pool.stats().runners == [], 30.0, "every runner idled away once the pool was quiet")
            assert pool.stats().warm == 0 and not pool.stats().booting
    finally:
        unsubscribe()
    boots = [f["why"] for name, f in events if name == "runner.boot.start" and f["pool"] == "quiet"]
    stops = [f["reason"] for name, f in events if name == "runner.stop" and f["pool"] == "quiet"]
    assert sorted(boots) == ["demand", "warm", "warm"] and stops == ["idle"] * 3  # and no spare booted again


async def test_single_use_takes_a_fresh_warm_runner_per_call() -> None:
    async with FlamePool("fresh", backend=ProcessBackend(), max=3, warm=1, single_use=True,
                         idle_shutdown_after=None) as pool:
        first = await pool.call(remote.pid)
        await until(lambda: not pool.stats().booting, 30.0, "a fresh spare for the next call")
        assert pool.stats().warm == 1
        spare = next(r.id for r in pool.stats().runners if r.warm)
        second = await pool.call(remote.runner_id_after, 0.0)
        assert second == spare  # the next call ran on the spare, booted before it
        assert first != await pool.call(remote.pid)  # and each call gets a runner of its own


def test_warm_is_checked_against_max() -> None:
    with pytest.raises(ValueError, match=r"warm .* must be between 0 and max=2"):
        FlamePool("w", backend=LocalBackend(), max=2, warm=3)
    with pytest.raises(TypeError, match="warm must be an int"):
        FlamePool("w", backend=LocalBackend(), warm=1.5)  # type: ignore[arg-type]
