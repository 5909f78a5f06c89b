"""Parent memory (VmRSS of this process): per booted runner, and per 1,000 queued calls.

Runners: RSS with ``memory_runners`` runners booted minus RSS before the pool started.
Queued calls: one runner with one slot held by a sleeping call; ``memory_queued``
callers pile up behind it (``stats().waiting``); RSS then minus RSS before, and the
Python heap growth tracemalloc saw meanwhile (RSS moves in pages and arenas).
Runs in a fresh interpreter (``python -m bench.memory``) so earlier runs' heap does not
hide the growth.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from bench import _subproc, tasks
from bench._config import Config
from bench._measure import now, rss_kb
from bench._subproc import run_json
from flame_asgi import FlamePool, ProcessBackend


async def measure(cfg: Config) -> dict[str, Any]:
    """Run the memory measurements in a fresh interpreter."""
    return await run_json("bench.memory", ["--quick"] if cfg.quick else [], 120.0)


async def _measure_here(cfg: Config) -> dict[str, Any]:
    async with FlamePool("bench-mem-warm", backend=ProcessBackend(), min=1, max=1) as pool:
        await pool.call(tasks.nothing)  # import and initialise everything a pool uses, once
    return {"available": True, **await _per_runner(cfg.memory_runners), **await _per_queued(cfg.memory_queued)}


async def _per_runner(count: int) -> dict[str, Any]:
    before = rss_kb()
    async with FlamePool("bench-mem", backend=ProcessBackend(), min=count, max=count) as pool:
        await asyncio.gather(*(pool.call(tasks.nothing) for _ in range(count * 4)))
        booted = len(pool.stats().runners)
        after = rss_kb()
    return {"runners": booted, "rss_before_kb": before, "rss_with_runners_kb": after,
            "per_runner_kb": round((after - before) / booted, 1)}


async def _per_queued(count: int) -> dict[str, Any]:
    trivial = tasks.make_closure(1)
    async with FlamePool("bench-queue", backend=ProcessBackend(), min=1, max=1, max_concurrency=1,
                         boot_timeout=120.0, timeout=120.0) as pool:
        await pool.call(trivial)
        before = rss_kb()
        waiting, failed, release = await _queue_up(pool, trivial, count)
        after = rss_kb()
        failed += await release()
        tracemalloc.start()  # a second pile-up, traced: tracemalloc's own tables would inflate RSS
        heap_before = tracemalloc.get_traced_memory()[0]
        _, more_failed, release = await _queue_up(pool, trivial, count)
        heap = tracemalloc.get_traced_memory()[0] - heap_before
        tracemalloc.stop()
        failed += more_failed + await release()
    return {"queued": waiting, "rss_queued_before_kb": before, "rss_queued_kb": after,
            "per_1000_queued_kb": round((after - before) * 1000 / max(waiting, 1), 1),
            "per_1000_queued_heap_kb": round(heap / 1024 * 1000 / max(waiting, 1), 1),
            "queued_failed": failed}


async def _queue_up(pool: FlamePool, fn: Any, count: int) -> tuple[int, int, Callable[[], Awaitable[int]]]:
    """Hold the pool's only slot and queue ``count`` calls behind it; ``release()`` drains them."""
    holder = asyncio.ensure_future(pool.call(tasks.sleep, 60.0))
    await asyncio.sleep(0.05)
    queued = [asyncio.ensure_future(pool.call(fn)) for _ in range(count)]
    deadline = now() + 10.0
    while pool.stats().waiting < count and now() < deadline:
        await asyncio.sleep(0.01)

    async def release() -> int:
        holder.cancel()  # linked: the runner stops the sleep and the queue drains
        await asyncio.gather(holder, return_exceptions=True)
        results = await asyncio.gather(*queued, return_exceptions=True)
        return sum(1 for r in results if r != 1)

    return pool.stats().waiting, 0, release


if __name__ == "__main__":
    _subproc.main(_measure_here)
