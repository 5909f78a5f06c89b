"""Cold calls: from nothing to the first result, beside what a fresh interpreter costs.

- ``empty_pool``: create a ProcessBackend pool with ``min=0`` and await one call.
- ``scale_from_zero``: the pool is running, its runner has idled away (and exited);
  a call arrives. The performance target is this one (≤ 20 ms).
- references: ``python -c pass``; a fresh interpreter + uvicorn + FastAPI app to its
  first HTTP response; and the same app forked from a pre-imported template process
  (``bench._forkref``) to its first response, what a fork server could reach.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import httpx

from bench import _uvicorn, tasks
from bench._config import Config
from bench._measure import best_time, now, ratio
from flame_asgi import FlamePool, ProcessBackend

IDLE = 0.2  # idle_shutdown_after for the scale-from-zero pool


async def measure(cfg: Config) -> dict[str, Any]:
    python = best_time([await _python_pass() for _ in range(cfg.cold_rounds)])
    fastapi = best_time([await _fastapi_first_response() for _ in range(cfg.cold_rounds)])
    forked = best_time(await _forked_first_responses(cfg.cold_rounds))
    empty = best_time([await _empty_pool() for _ in range(cfg.cold_rounds)])
    zero = await _scale_from_zero(cfg.cold_rounds)
    return {
        "empty_pool": empty,
        "scale_from_zero": zero,
        "python_c_pass": python,
        "fresh_uvicorn_fastapi": fastapi,
        "forked_uvicorn_fastapi": forked,
        "ratios": {
            "scale_from_zero_over_forked_fastapi": ratio(zero["best_ms"], forked["best_ms"]),
            "scale_from_zero_over_fresh_fastapi": ratio(zero["best_ms"], fastapi["best_ms"]),
            "empty_pool_over_fresh_fastapi": ratio(empty["best_ms"], fastapi["best_ms"]),
        },
    }


async def _python_pass() -> float:
    start = now()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    return now() - start


async def _fastapi_first_response() -> float:
    async with httpx.AsyncClient() as client:
        start = now()
        proc, url = await _uvicorn.start("bench.fastapi_app:app")
        try:
            response = await client.get(url + "/", timeout=30.0)
            response.raise_for_status()
            return now() - start
        finally:
            await _uvicorn.stop(proc)


async def _forked_first_responses(rounds: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    template = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench._forkref", env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, start_new_session=True)
    assert template.stdin is not None and template.stdout is not None
    samples = []
    try:
        await template.stdout.readline()  # "ready": everything is imported
        async with httpx.AsyncClient() as client:
            for _ in range(rounds):
                start = now()
                template.stdin.write(b"fork\n")
                port = int(await template.stdout.readline())
                response = await client.get(f"http://127.0.0.1:{port}/", timeout=30.0)
                response.raise_for_status()
                samples.append(now() - start)
    finally:
        try:
            os.killpg(template.pid, signal.SIGKILL)  # the template and the children it forked
        except ProcessLookupError:
            pass
        await template.wait()
    return samples


async def _empty_pool() -> float:
    trivial = tasks.make_closure(1)
    start = now()
    async with FlamePool("bench-cold", backend=ProcessBackend(), min=0, max=1) as pool:
        await pool.call(trivial)
        return now() - start


async def _scale_from_zero(rounds: int) -> dict[str, Any]:
    trivial = tasks.make_closure(1)
    samples = []
    async with FlamePool("bench-zero", backend=ProcessBackend(), min=0, max=1,
                         idle_shutdown_after=IDLE) as pool:
        await pool.call(trivial)  # whatever the pool warms on its first boot, it has now
        for _ in range(rounds):
            await _idled_away(pool)
            start = now()
            await pool.call(trivial)
            samples.append(now() - start)
    return {**best_time(samples), "idle_shutdown_after_s": IDLE}


async def _idled_away(pool: FlamePool) -> None:
    """Wait until the pool has no runner (stopped and reaped) and nothing booting."""
    deadline = now() + 30.0
    while True:
        stats = pool.stats()
        if not stats.runners and not stats.booting:
            break
        if now() > deadline:
            raise RuntimeError(f"runner did not idle away: {stats}")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # let the machine settle after the runner's exit
