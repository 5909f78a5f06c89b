"""Soak: 10,000 calls through a ProcessBackend pool while runners are killed at random.
Every call returns its correct result or raises a documented error; none hangs, none is
lost, the pool never runs more than ``max`` runners, and no process is left behind.
With as many retries as runners killed, every call returns its result, and none runs again
after it returned."""

from __future__ import annotations

import asyncio
import collections
import pathlib
import random
import time

import pytest

from flame_asgi import BootError, CallTimeout, FlamePool, ProcessBackend, RunnerLost
from tests.conftest import child_pids
from tests.reliability import work
from tests.reliability.support import alive, kill, runner_pids

CALLS = 10_000
MAX = 3
CONCURRENCY = 20
CALLERS = 60


@pytest.mark.slow
async def test_ten_thousand_calls_with_random_runner_kills() -> None:
    rng = random.Random(20240611)
    before = child_pids()
    outcomes: collections.Counter[str] = collections.Counter()
    wrong: list[tuple[int, object]] = []
    seen: set[int] = set()
    kills: list[int] = []
    most_alive = 0
    todo = iter(range(CALLS))
    backend = ProcessBackend(heartbeat_interval=0.5, heartbeat_timeout=5.0)
    pool = FlamePool("soak", backend=backend, max=MAX, max_concurrency=CONCURRENCY, boot_timeout=15, timeout=15,
                     idle_shutdown_after=None)

    async def caller() -> None:
        for i in todo:
            fn = work.square if i % 3 else work.asquare
            try:
                result = await pool.call(fn, i)
            except (RunnerLost, CallTimeout, BootError) as exc:
                outcomes[type(exc).__name__] += 1
                # Back off a little, as a client would: a call that fails at once would
                # otherwise spin through the whole workload while BUG-3 lasts.
                await asyncio.sleep(0.01)
            else:
                outcomes["ok"] += 1
                if result != i * i:
                    wrong.append((i, result))

    async def chaos(stop: asyncio.Event) -> None:
        nonlocal most_alive
        next_kill = time.monotonic() + rng.uniform(0.05, 0.25)
        while not stop.is_set():
            await asyncio.sleep(0.02)
            pids = list(runner_pids(pool).values())
            seen.update(pids)
            most_alive = max(most_alive, sum(alive(p) for p in seen))
            if pids and time.monotonic() >= next_kill:
                victim = rng.choice(pids)
                kill(victim)
                kills.append(victim)
                next_kill = time.monotonic() + rng.uniform(0.05, 0.25)

    started = time.monotonic()
    stop = asyncio.Event()
    await pool.start()
    try:
        monkey = asyncio.create_task(chaos(stop))
        async with asyncio.timeout(150):  # nothing hangs
            await asyncio.gather(*(caller() for _ in range(CALLERS)))
        stop.set()
        await monkey
    finally:
        await pool.aclose()
    took = time.monotonic() - started
    print(f"\nsoak: {CALLS} calls in {took:.1f} s, {len(kills)} runners killed, {len(seen)} runners used, "
          f"outcomes {dict(outcomes)}")
    assert sum(outcomes.values()) == CALLS  # none lost
    assert wrong == []
    assert outcomes["ok"] > CALLS * 0.5
    assert len(kills) >= 5
    assert most_alive <= MAX
    assert not any(alive(p) for p in seen)  # every runner, killed or not, is gone...
    deadline = time.monotonic() + 5
    while child_pids() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert child_pids() - before == set()  # ...and reaped, fork server included


@pytest.mark.slow
async def test_with_retries_every_call_succeeds_and_none_runs_after_it_returned(tmp_path: pathlib.Path) -> None:
    rng = random.Random(20261201)
    before = child_pids()
    calls = CALLS
    returned: dict[int, float] = {}
    failures: list[BaseException] = []
    kills: list[int] = []
    todo = iter(range(calls))
    backend = ProcessBackend(heartbeat_interval=0.5, heartbeat_timeout=5.0)
    # The monkey kills at most as many runners as a call may retry: then no call can lose
    # more runners than its retries, whatever the timing. With retries=3 and no cap, the
    # calls retried after one kill crowd onto the next runner, and the next kill takes them
    # all again: a run on a fresh clone lost 2 of 10,000 calls to a fourth loss.
    retries = 6
    pool = FlamePool("soak-retries", backend=backend, max=MAX, max_concurrency=CONCURRENCY, boot_timeout=15,
                     timeout=15, idle_shutdown_after=None, retries=retries)

    async def caller() -> None:
        for i in todo:
            try:
                result = await pool.call(work.square_logged, i, str(tmp_path))
            except Exception as exc:
                failures.append(exc)
            else:
                returned[i] = time.time()
                assert result == i * i

    async def chaos(stop: asyncio.Event) -> None:
        while not stop.is_set() and len(kills) < retries:
            await asyncio.sleep(rng.uniform(0.05, 0.25))
            pids = list(runner_pids(pool).values())
            if pids:
                victim = rng.choice(pids)
                kill(victim)
                kills.append(victim)

    stop = asyncio.Event()
    await pool.start()
    try:
        monkey = asyncio.create_task(chaos(stop))
        async with asyncio.timeout(150):
            await asyncio.gather(*(caller() for _ in range(CALLERS)))
        stop.set()
        await monkey
    finally:
        await pool.aclose()
    runs: collections.defaultdict[int, list[float]] = collections.defaultdict(list)
    for log in tmp_path.glob("runs.*"):
        for line in log.read_text().splitlines():
            value, at = line.split()
            runs[int(value)].append(float(at))
    again = sum(len(times) - 1 for times in runs.values())
    print(f"\nsoak with retries={retries}: {calls} calls, {len(kills)} runners killed, {len(returned)} returned, "
          f"{again} re-executions after a lost runner")
    assert failures == []  # every call succeeded
    assert len(returned) == calls
    assert len(kills) >= 5
    late = [i for i, times in runs.items() if max(times) > returned[i]]
    assert late == []  # no execution started after its call had returned
    assert set(runs) == set(range(calls))
    deadline = time.monotonic() + 5
    while child_pids() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert child_pids() - before == set()
