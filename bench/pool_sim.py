"""Pool bookkeeping at scale: ``PoolState`` alone (no I/O), 10 to 10,000 runners.

Each size gets the same number of waiting callers (1,000,000; 100,000 with ``--quick``)
queued behind runners whose slots are all taken, and the same decisions are timed,
each one alone in a loop, best of ``rounds`` rounds:

- ``acquire_and_release``: a call that finds a free slot (the least-loaded runner's; none
  queued) and ends, the two decisions timed as a pair;
- ``acquire_queue``: a call that finds none and queues behind the waiters;
- ``release_grant``: a call ends and its slot goes to the first waiter;
- ``forget_waiter``: a queued caller gives up (cancelled or timed out) from mid-queue;
- ``idle_runners``: the idle sweep picks the longest-idle runner of a pool whose
  runners are all idle, at distinct times (the runner is then replaced, untimed).

O(log n) per decision means the 10,000-runner figures stay within log(10,000) /
log(10) = 4x of the 10-runner ones; the ``worst_ratio`` is checked against that. The
garbage collector is paused while timing: with a million queued callers alive, a full
collection would walk them all, which measures the interpreter, not the bookkeeping.

``python -m bench.pool_sim [--quick]`` runs it alone and prints the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from collections.abc import Callable
from typing import Any

from bench._config import Config
from bench._measure import now
from flame_asgi._pool.state import PoolState

SIZES = (10, 1_000, 10_000)
CAPACITY = 4  # max_concurrency of the simulated runners
LOG_BOUND = math.log(SIZES[-1]) / math.log(SIZES[0])  # 4.0: what O(log n) allows from 10 to 10,000


def measure_sync(cfg: Config) -> dict[str, Any]:
    waiters = cfg.pool_sim_waiters
    per_size = {str(n): _size(n, waiters, cfg.pool_sim_ops, cfg.rounds) for n in SIZES}
    small, large = per_size[str(SIZES[0])], per_size[str(SIZES[-1])]
    ratios = {op: round(large[op] / small[op], 2) for op in small}
    return {"available": True, "capacity": CAPACITY, "waiters": waiters, "ops_per_round": cfg.pool_sim_ops,
            "rounds": cfg.rounds, "per_decision_us": per_size, "ratio_largest_over_smallest": ratios,
            "worst_ratio": max(ratios.values()), "log_bound": LOG_BOUND}


async def measure(cfg: Config) -> dict[str, Any]:
    return measure_sync(cfg)


def _size(runners: int, waiters: int, ops: int, rounds: int) -> dict[str, float]:
    gc.collect()
    gc.disable()
    try:
        return {"acquire_and_release": _best(rounds, lambda: _acquire_release(runners, ops)),
                **_queued(runners, waiters, ops, rounds),
                "idle_runners": _best(rounds, lambda: _idle_sweep(runners, ops))}
    finally:
        gc.enable()
        gc.collect()


def _best(rounds: int, one_round: Callable[[], float]) -> float:
    """Microseconds per decision, best of ``rounds``."""
    return round(min(one_round() for _ in range(rounds)) * 1e6, 3)


def _booted(runners: int) -> PoolState[int]:
    state: PoolState[int] = PoolState(min=0, max=runners, max_concurrency=CAPACITY, single_use=False)
    for i in range(runners):
        state.boot_started()
        state.boot_succeeded(f"r{i}", 0.0)
    return state


def _acquire_release(runners: int, ops: int) -> float:
    """Half the slots busy, nobody queued: a call takes the least-loaded runner's slot and
    ends. Timed as the pair (no timer call between them), so the load never drifts."""
    state = _booted(runners)
    for w in range(runners * CAPACITY // 2):
        state.acquire(w, 0.0)
    start = now()
    for w in range(ops):
        rid = state.acquire(w, 0.0)[0]
        state.release(rid, 0.0)  # type: ignore[arg-type]
    return (now() - start) / ops


def _queued(runners: int, waiters: int, ops: int, rounds: int) -> dict[str, float]:
    """Every slot taken, ``waiters`` callers queued behind them."""
    state = _booted(runners)
    busy = [rid for w in range(runners * CAPACITY) if (rid := state.acquire(w, 0.0)[0]) is not None]
    assert len(busy) == runners * CAPACITY
    next_waiter = runners * CAPACITY
    for _ in range(waiters):
        state.acquire(next_waiter, 0.0)
        next_waiter += 1
    assert len(state.waiters) == waiters
    out: dict[str, list[float]] = {"acquire_queue": [], "release_grant": [], "forget_waiter": []}
    for _ in range(rounds):
        # Release a slot: the first waiter gets it. Then one more caller queues behind.
        start = now()
        for i in range(ops):
            state.release(busy[i % len(busy)], 1.0)
        out["release_grant"].append((now() - start) / ops)
        start = now()
        for _ in range(ops):
            state.acquire(next_waiter, 1.0)
            next_waiter += 1
        out["acquire_queue"].append((now() - start) / ops)
        # A caller from the middle of the queue gives up; the queue keeps its length.
        middle = next_waiter - waiters // 2
        start = now()
        for i in range(ops):
            state.forget_waiter(middle - 2 * i)
        out["forget_waiter"].append((now() - start) / ops)
        for _ in range(ops):
            state.acquire(next_waiter, 1.0)
            next_waiter += 1
        assert len(state.waiters) == waiters
    return {op: round(min(times) * 1e6, 3) for op, times in out.items()}


def _idle_sweep(runners: int, ops: int) -> float:
    """All runners idle since distinct times; each sweep stops the longest idle, which a
    fresh runner then replaces (untimed), so the pool keeps its size."""
    state: PoolState[int] = PoolState(min=0, max=runners + 1, max_concurrency=CAPACITY, single_use=False)
    for i in range(runners):
        state.boot_started()
        state.boot_succeeded(f"r{i}", float(i))
    clock, total, swept = float(runners), 0.0, 0
    for i in range(ops):
        # The longest idle runner has idled runners + 0.5 s, the next one a second less.
        start = now()
        idle = state.idle_runners(clock + 0.5, idle_after=float(runners), min_idle_after=None)
        total += now() - start
        swept += len(idle)
        for rid in idle:
            state.remove(rid)
        state.boot_started()
        state.boot_succeeded(f"n{i}", clock)
        clock += 1.0
    assert swept == ops, f"expected one idle runner per sweep, got {swept} in {ops}"
    return total / ops


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pool_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure_sync(Config.make(args.quick)), indent=1))


if __name__ == "__main__":
    main()
