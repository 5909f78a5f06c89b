"""Timing and summary helpers shared by every benchmark module."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

now = time.perf_counter
MIN_SAMPLES = 30  # a round stopped by its time budget still has this many


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted samples (``q`` in 0..100)."""
    if not sorted_samples:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_samples)))
    return sorted_samples[rank - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """p50/p90/p99/mean in microseconds, and the samples themselves (for the plot)."""
    us = sorted(s * 1e6 for s in seconds)
    return {
        "n": len(us),
        "p50_us": round(percentile(us, 50), 1),
        "p90_us": round(percentile(us, 90), 1),
        "p99_us": round(percentile(us, 99), 1),
        "mean_us": round(statistics.fmean(us), 1) if us else math.nan,
        "samples_us": [round(x, 1) for x in us],
    }


def best_latency(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the lowest p50, plus every round's p50 for the record."""
    best = dict(min(rounds, key=lambda r: r["p50_us"]))
    best["rounds_p50_us"] = [r["p50_us"] for r in rounds]
    return best


def best_rate(rates: list[float], key: str) -> dict[str, Any]:
    """The highest of several rates (calls/s, MB/s), with every round kept."""
    return {key: round(max(rates), 1), f"rounds_{key}": [round(r, 1) for r in rates]}


def best_time(seconds: list[float]) -> dict[str, Any]:
    """The shortest of several wall times, in milliseconds, with every round kept."""
    ms = [s * 1000 for s in seconds]
    return {"best_ms": round(min(ms), 1), "median_ms": round(statistics.median(ms), 1),
            "rounds_ms": [round(x, 1) for x in ms]}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator or math.isnan(numerator) or math.isnan(denominator):
        return None
    return round(numerator / denominator, 2)


def rss_kb() -> int:
    """This process's resident set size (VmRSS), after a collection."""
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


async def timed_calls(fn: Callable[[], Awaitable[object]], calls: int, warmup: int,
                      budget: float | None = None) -> list[float]:
    """Await ``fn()`` ``warmup`` times untimed, then up to ``calls`` times, one at a time,
    stopping early (after at least ``MIN_SAMPLES``) once ``budget`` seconds have passed."""
    for _ in range(warmup):
        await fn()
    samples: list[float] = []
    deadline = None if budget is None else now() + budget
    for _ in range(calls):
        start = now()
        await fn()
        samples.append(now() - start)
        if deadline is not None and start > deadline and len(samples) >= MIN_SAMPLES:
            break
    return samples


async def latency_rounds(fn: Callable[[], Awaitable[object]], calls: int, warmup: int, rounds: int,
                         budget: float | None = None) -> dict[str, Any]:
    """Best of ``rounds`` rounds of sequential calls (see ``best_latency``)."""
    results = []
    for i in range(rounds):
        samples = await timed_calls(fn, calls, warmup if i == 0 else warmup // 4, budget)
        results.append(latency_summary(samples))
    return best_latency(results)
