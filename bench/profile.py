"""``python -m bench.profile [--calls N] [--out DIR]``: where a warm call's time goes.

For sequential warm calls, concurrent batches (the throughput shape) and a large
payload echo through one ProcessBackend runner, it reports CPU time per call in the parent and in the
runner (from ``/proc``) beside the same figures for the bare WebSocket echo floor, the
cost of each piece of a call timed alone (``bench._components``), and profiles both
sides with pyinstrument (``pip install pyinstrument``): the parent around the loop, the
runner from its own lifespan (``bench.profiled_app``). Profiles land in DIR (default
``bench/results/profile``) with ``summary.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import connect

from bench import _components, _proc, _uvicorn, tasks
from bench._config import MB
from bench.run import RESULTS
from flame_asgi import FlamePool, ProcessBackend

TICK = os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    """CPU seconds used so far by this process's live descendants: the runners, which are
    the fork server's children (so this process's grandchildren), and the fork server."""
    parents, used = {}, {}
    for pid, fields in _proc.stats():
        parents[pid] = int(fields[1])  # fields[1] is the parent pid
        used[pid] = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
    me, total = os.getpid(), 0.0
    for pid in parents:
        ancestor = parents[pid]
        while ancestor not in (me, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == me:
            total += used[pid]
    return total


async def _cpu_per_call(label: str, loop: Callable[[], Awaitable[int]]) -> dict[str, Any]:
    wall, cpu, child = time.perf_counter(), time.process_time(), _children_cpu()
    calls = await loop()
    wall, cpu, child = time.perf_counter() - wall, time.process_time() - cpu, _children_cpu() - child
    result = {"calls": calls, "wall_us_per_call": round(wall / calls * 1e6, 1),
              "parent_cpu_us_per_call": round(cpu / calls * 1e6, 1),
              "runner_cpu_us_per_call": round(child / calls * 1e6, 1)}
    print(f"{label}: {result}")
    return result


async def _floor(calls: int) -> dict[str, Any]:
    """The same accounting for a bare WebSocket echo (787-byte messages, one call's frame)."""
    message = b"x" * 787
    result: dict[str, Any] = {}
    async with _uvicorn.serving("bench.apps:echo_app") as url, connect(
            url.replace("http", "ws", 1) + "/", compression=None, ping_interval=None) as ws:
        async def sequential() -> int:
            for _ in range(calls):
                await ws.send(message)
                await ws.recv()
            return calls

        await sequential()
        result["sequential"] = await _cpu_per_call("floor: WS echo, sequential", sequential)
    return result


async def main(calls: int, out: pathlib.Path, interval: float, payload_mb: int) -> None:
    from pyinstrument import Profiler

    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"components_us": await _components.measure()}
    print(f"components: {summary['components_us']}")
    summary["floor"] = await _floor(calls)
    os.environ["BENCH_PROFILE_DIR"] = str(out)
    os.environ["BENCH_PROFILE_INTERVAL"] = str(interval)
    trivial = tasks.make_closure(1)

    async def sequential() -> int:
        for _ in range(calls):
            await pool.call(trivial)
        return calls

    data = os.urandom(payload_mb * MB)

    async def big() -> int:
        for _ in range(3):
            await pool.call(tasks.echo, data)
        return 3

    async def batches() -> int:
        for _ in range(calls // 200):
            await asyncio.gather(*(pool.call(trivial) for _ in range(200)))
        return calls // 200 * 200

    pool = FlamePool("bench-cpu", backend=ProcessBackend(), min=1, max=1, timeout=300.0)
    async with pool:  # first, CPU accounting with nothing profiled
        await batches()  # warm up
        for name, loop in (("sequential", sequential), ("batches", batches)):
            summary[f"call_{name}"] = await _cpu_per_call(f"call, {name}", loop)
        summary[f"call_{payload_mb}MB_echo"] = await _cpu_per_call(f"{payload_mb} MB echo", big)
    pool = FlamePool("bench-profile", backend=ProcessBackend(app="bench.profiled_app:app"), min=1, max=1,
                     timeout=300.0)
    async with pool:
        await batches()
        for name, loop in (("sequential", sequential), ("batches", batches), (f"echo-{payload_mb}MB", big)):
            profiler = Profiler(interval=interval, async_mode="disabled")
            profiler.start()
            await loop()
            profiler.stop()
            (out / f"parent-{name}.txt").write_text(profiler.output_text())
            (out / f"parent-{name}-flat.txt").write_text(profiler.output_text(flat=True))
    # the runner writes its profile (both loops together) when the pool stops it
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"profiles in {out}: " + ", ".join(sorted(p.name for p in out.glob("*.txt"))))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=0.0002)
    parser.add_argument("--payload-mb", type=int, default=100, help="size of the echoed payload workload")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "profile")
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.out, args.interval, args.payload_mb))
