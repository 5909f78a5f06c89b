"""Payload round trips: a ``bytes`` argument of 1, 10 and 100 MB echoed back by the runner.

MB/s is the payload size (decimal MB) over the round-trip time, the best of the rounds;
the bytes cross the channel twice (argument and result).
"""

from __future__ import annotations

import os
from typing import Any

from bench import tasks
from bench._config import MB, Config
from bench._measure import best_rate, now
from flame_asgi import FlamePool, ProcessBackend


async def measure(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with FlamePool("bench-payload", backend=ProcessBackend(), min=1, max=1, timeout=120.0) as pool:
        for size_mb, rounds in zip(cfg.payload_sizes_mb, cfg.payload_rounds, strict=True):
            out[f"{size_mb}MB"] = await echo_rates(pool, size_mb, rounds, "")
    return out


async def echo_rates(pool: FlamePool, size_mb: int, rounds: int, where: str) -> dict[str, Any]:
    """Echo ``size_mb`` MB of random bytes through ``pool`` ``rounds`` times: the best MB/s."""
    data = os.urandom(size_mb * MB)
    rates = []
    for _ in range(rounds):
        start = now()
        back = await pool.call(tasks.echo, data)
        elapsed = now() - start
        if back != data:
            raise AssertionError(f"{size_mb} MB echo{where} came back different")
        rates.append(size_mb / elapsed)
        del back
    return {**best_rate(rates, "mb_per_s"), "best_round_trip_ms": round(size_mb / max(rates) * 1000, 1)}
