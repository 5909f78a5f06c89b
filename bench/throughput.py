"""Trivial-call throughput through one pool: many concurrent callers, in gather batches.

The pool's runners are booted first (``min=max``), so this measures steady state:
``batch`` callers at once, batch after batch, until ``calls`` calls have returned (or
the round's time budget has passed).
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import tasks
from bench._config import Config
from bench._measure import best_rate, now
from flame_asgi import FlamePool, ProcessBackend


async def measure(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"calls": cfg.throughput_calls, "batch": cfg.throughput_batch}
    for runners in (1, 2):
        out[f"max_{runners}"] = await _pool_rate(cfg, runners)
    return out


async def _pool_rate(cfg: Config, runners: int) -> dict[str, Any]:
    trivial = tasks.make_closure(1)
    async with FlamePool(f"bench-tput-{runners}", backend=ProcessBackend(), min=runners, max=runners,
                         max_concurrency=100) as pool:
        await _run(pool, trivial, cfg.throughput_batch, cfg.throughput_batch * 2, None)  # warm up
        rates = []
        for _ in range(cfg.rounds):
            start = now()
            done = await _run(pool, trivial, cfg.throughput_batch, cfg.throughput_calls, cfg.throughput_budget_s)
            rates.append(done / (now() - start))
        used = len(pool.stats().runners)
    return {**best_rate(rates, "calls_per_s"), "runners_used": used}


async def _run(pool: FlamePool, fn: Any, batch: int, calls: int, budget: float | None) -> int:
    """``calls`` calls, ``batch`` at a time; stops after the batch that passes ``budget`` s."""
    done, deadline = 0, None if budget is None else now() + budget
    while done < calls and (deadline is None or now() < deadline):
        n = min(batch, calls - done)
        await asyncio.gather(*(pool.call(fn) for _ in range(n)))
        done += n
    return done
