"""Scale-out: a CPU-bound task set (``spin_tasks`` pure-Python loops of ~``spin_ms``
each) on one runner, then on two; the speed-up is the ratio of the two wall times."""

from __future__ import annotations

import asyncio
from typing import Any

from bench import tasks
from bench._config import Config
from bench._measure import best_time, now, ratio
from flame_asgi import FlamePool, ProcessBackend


async def measure(cfg: Config, iterations: int) -> dict[str, Any]:
    out: dict[str, Any] = {"tasks": cfg.spin_tasks, "task_ms": cfg.spin_ms, "iterations": iterations}
    for runners in (1, 2):
        out[f"runners_{runners}"] = await _wall_time(cfg, runners, iterations)
    out["speedup"] = ratio(out["runners_1"]["best_ms"], out["runners_2"]["best_ms"])
    return out


async def _wall_time(cfg: Config, runners: int, iterations: int) -> dict[str, Any]:
    async with FlamePool(f"bench-spin-{runners}", backend=ProcessBackend(), min=runners, max=runners,
                         max_concurrency=100) as pool:
        await asyncio.gather(*(pool.call(tasks.spin, 1000) for _ in range(runners * 2)))  # warm up
        samples = []
        for _ in range(cfg.scaleout_rounds):
            start = now()
            await asyncio.gather(*(pool.call(tasks.spin, iterations) for _ in range(cfg.spin_tasks)))
            samples.append(now() - start)
    return best_time(samples)
