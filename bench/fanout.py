"""Fan-out: ``pool.map`` of many trivial items over 100 runners, and the parent's memory.

A ProcessBackend pool boots ``fanout_runners`` runners (``min=max``), then each round maps
``tasks.identity`` over ``range(fanout_items)`` with the default ``max_in_flight`` (every
slot the pool has) and consumes the results in order: items/s, best of the rounds. Then
two untimed rounds under ``tracemalloc``, of half the items and of all of them: the peak
of what the map allocated in the parent. A map whose memory is bounded peaks the same for
both (the peer's ``ray.get([f.remote(x) for x in ...])`` holds every reference at once
by design).
"""

from __future__ import annotations

import tracemalloc
from typing import Any

from bench import tasks
from bench._config import Config
from bench._measure import best_rate, now
from flame_asgi import FlamePool, ProcessBackend


async def measure(cfg: Config) -> dict[str, Any]:
    runners, items = cfg.fanout_runners, cfg.fanout_items
    async with FlamePool("bench-fanout", backend=ProcessBackend(), min=runners, max=runners,
                         idle_shutdown_after=None, boot_timeout=300.0) as pool:
        await _map(pool, runners * 20)  # every runner answers before anything is timed
        rates = []
        for _ in range(cfg.fanout_rounds):
            start = now()
            await _map(pool, items)
            rates.append(items / (now() - start))
        half, whole = await _peak_mb(pool, items // 2), await _peak_mb(pool, items)
        used = len(pool.stats().runners)
    return {"available": True, "items": items, "runners": used, "max_in_flight": pool.max * pool.max_concurrency,
            **best_rate(rates, "items_per_s"),
            "parent_peak_mb": whole, "half": {"items": items // 2, "parent_peak_mb": half}}


async def _peak_mb(pool: FlamePool, items: int) -> float:
    """The peak of the parent's Python allocations during one map of ``items``, in MB."""
    tracemalloc.start()
    try:
        await _map(pool, items)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return round(peak / 1e6, 1)


async def _map(pool: FlamePool, items: int) -> int:
    count = 0
    async for value in pool.map(tasks.identity, range(items)):
        if value != count:
            raise AssertionError(f"fanout: item {count} came back as {value!r}")
        count += 1
    return count
