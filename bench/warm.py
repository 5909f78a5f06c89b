"""Warm runners (``warm=``): what a spare saves a caller, on ProcessBackend and DockerBackend.

- ``busy_call``: the pool's runner is held by a long call and another call arrives.
  ``cold``: ``warm=0``, it waits for a boot. ``warm``: ``warm=1``, it runs on the spare
  booted beside the first runner. Time to its result; each round a fresh pool. On
  DockerBackend also ``standby``: ``warm=0`` with ``DockerBackend(standby=1)``, the boot
  it waits for starts a container created ahead instead of creating one.
- ``burst`` (ProcessBackend): ``max=10, max_concurrency=5``. One call first (the pool is in
  use), the pool then idle (with ``warm=10`` its spares are up), then 50 calls of 10 ms at
  once: the time to the first result and the p50/p99 of the 50 calls' latencies, the round
  with the best p50 of three, ``warm=0`` against ``warm=10``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from bench import container, tasks
from bench._config import Config
from bench._measure import best_time, now, percentile, ratio, unavailable
from flame_asgi import Backend, FlamePool, ProcessBackend

BURST_CALLS, BURST_MAX, BURST_CONCURRENCY, BURST_WORK_S = 50, 10, 5, 0.01


async def measure(cfg: Config) -> dict[str, Any]:
    process = await _busy_calls(ProcessBackend, cfg.cold_rounds)
    burst = {"cold": await _bursts(0, cfg.cold_rounds), "warm": await _bursts(BURST_MAX, cfg.cold_rounds)}
    missing = await container._engine_missing()
    docker = unavailable(missing) if missing else await _busy_calls(container._backend, cfg.cold_rounds,
                                                                    standby=True)
    return {
        "process_busy_call": process, "docker_busy_call": docker, "burst": burst,
        "ratios": {
            "process_cold_over_warm": ratio(process["cold"]["best_ms"], process["warm"]["best_ms"]),
            "docker_cold_over_warm": ratio(docker.get("cold", {}).get("best_ms"),
                                           docker.get("warm", {}).get("best_ms")),
            "docker_cold_over_standby": ratio(docker.get("cold", {}).get("best_ms"),
                                              docker.get("standby", {}).get("best_ms")),
            "burst_first_result_cold_over_warm": ratio(burst["cold"]["first_result_ms"],
                                                       burst["warm"]["first_result_ms"]),
            "burst_p99_cold_over_warm": ratio(burst["cold"]["p99_ms"], burst["warm"]["p99_ms"]),
        },
    }


async def _busy_calls(backend: Callable[..., Backend], rounds: int, standby: bool = False) -> dict[str, Any]:
    out = {}
    variants = [("cold", 0, {}), ("warm", 1, {})] + ([("standby", 0, {"standby": 1})] if standby else [])
    for label, warm, options in variants:
        samples = []
        for _ in range(rounds):
            async with FlamePool("bench-warm", backend=backend(**options), max=2, max_concurrency=1, warm=warm,
                                 boot_timeout=60.0, timeout=60.0, idle_shutdown_after=None) as pool:
                holder = asyncio.ensure_future(pool.call(tasks.sleep, 30.0))
                # The holder runs; spares are up; the prepared container is created.
                while (not pool.stats().runners or pool.stats().booting
                       or pool.stats().standby < options.get("standby", 0)):
                    await asyncio.sleep(0.01)
                start = now()
                await pool.call(tasks.nothing)
                samples.append(now() - start)
                holder.cancel()
                await asyncio.gather(holder, return_exceptions=True)
        out[label] = best_time(samples)
    return out


async def _bursts(warm: int, rounds: int) -> dict[str, Any]:
    results = [await _burst(warm) for _ in range(rounds)]
    best = dict(min(results, key=lambda r: r["p50_ms"]))
    best["rounds_p50_ms"] = [r["p50_ms"] for r in results]
    return best


async def _burst(warm: int) -> dict[str, Any]:
    async with FlamePool("bench-warm-burst", backend=ProcessBackend(), max=BURST_MAX,
                         max_concurrency=BURST_CONCURRENCY, warm=warm, boot_timeout=60.0,
                         idle_shutdown_after=None) as pool:
        await pool.call(tasks.nothing)
        while pool.stats().booting:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # idle: nothing runs when the burst arrives
        up = len(pool.stats().runners)
        start = now()
        latencies: list[float] = []

        async def one() -> None:
            await pool.call(tasks.sleep, BURST_WORK_S)
            latencies.append(now() - start)

        await asyncio.gather(*(one() for _ in range(BURST_CALLS)))
    ms = sorted(x * 1000 for x in latencies)
    return {"warm": warm, "runners_up_before": up, "calls": BURST_CALLS, "first_result_ms": round(ms[0], 1),
            "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1)}
