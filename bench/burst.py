"""Burst: ``burst_calls`` concurrent calls through ``max=4, max_concurrency=10``, from an
empty pool. Every call must come back with its own argument: ``lost`` counts the ones
that raised or returned something else."""

from __future__ import annotations

import asyncio
from typing import Any

from bench import tasks
from bench._config import Config
from bench._measure import best_time, now
from flame_asgi import FlamePool, ProcessBackend

MAX, MAX_CONCURRENCY = 4, 10


async def measure(cfg: Config) -> dict[str, Any]:
    times, lost, errors, peak_waiting = [], 0, [], 0
    for _ in range(cfg.burst_rounds):
        elapsed, round_lost, round_errors, waiting = await _burst(cfg.burst_calls)
        times.append(elapsed)
        lost += round_lost
        errors += round_errors
        peak_waiting = max(peak_waiting, waiting)
    return {"calls": cfg.burst_calls, "max": MAX, "max_concurrency": MAX_CONCURRENCY, **best_time(times),
            "lost": lost, "errors": sorted(set(errors))[:5], "peak_waiting": peak_waiting}


async def _burst(calls: int) -> tuple[float, int, list[str], int]:
    async with FlamePool("bench-burst", backend=ProcessBackend(), min=0, max=MAX,
                         max_concurrency=MAX_CONCURRENCY, boot_timeout=60.0, timeout=60.0) as pool:
        start = now()
        pending = [asyncio.ensure_future(pool.call(tasks.identity, i)) for i in range(calls)]
        await asyncio.sleep(0)
        waiting = pool.stats().waiting
        results = await asyncio.gather(*pending, return_exceptions=True)
        elapsed = now() - start
    lost = [r for i, r in enumerate(results) if r != i]
    errors = [f"{type(r).__name__}: {r}" for r in lost if isinstance(r, BaseException)]
    return elapsed, len(lost), errors, waiting
