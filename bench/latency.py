"""Warm ``call`` round trip through ProcessBackend: one booted runner, sequential calls.

``closure`` (the headline, a lambda pickled by value on every call, as most call sites
are), ``function`` (a module-level function, pickled by reference) and
``async_function`` (no worker-thread hop on the runner) are measured on the same
runner, best of ``rounds`` rounds each.
"""

from __future__ import annotations

from typing import Any

from bench import tasks
from bench._config import Config
from bench._measure import latency_rounds
from flame_asgi import FlamePool, ProcessBackend


async def measure(cfg: Config) -> dict[str, Any]:
    trivial = tasks.make_closure(1)
    async with FlamePool("bench-latency", backend=ProcessBackend(), min=1, max=1) as pool:
        closure = await latency_rounds(lambda: pool.call(trivial), cfg.latency_calls, cfg.latency_warmup,
                                       cfg.rounds, cfg.latency_budget_s)
        function = await latency_rounds(lambda: pool.call(tasks.nothing), cfg.latency_calls,
                                        cfg.latency_warmup, cfg.rounds, cfg.latency_budget_s)
        async_function = await latency_rounds(lambda: pool.call(tasks.nothing_async), cfg.latency_calls,
                                              cfg.latency_warmup, cfg.rounds, cfg.latency_budget_s)
    return {"closure": closure, "function": function, "async_function": async_function}
