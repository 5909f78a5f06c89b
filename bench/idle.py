"""What idle runners cost: CPU and memory of the parent and of the runners, per runner.

For each count N (quick: 10, 50, 150; full: up to 500), a ProcessBackend pool boots N
runners (``min=max=N``), every runner answers one call, then nothing runs. After a
settle period, over a window of W seconds: the parent's CPU time (``process_time``,
all its threads), the runners' and the fork server's (every thread's time on a CPU, from
``/proc/PID/task/TID/schedstat``, in ns), as a share of one core; their wake-ups
(voluntary context switches per second); the parent's RSS growth per runner and each runner's PSS (its share of pages,
fork-shared ones split). A least-squares line through the counts gives the per-runner
cost and the estimate at 10,000 runners, with the formula. Runs in a fresh interpreter
(``python -m bench.idle``), alone: the machine's other load is in the figures.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from bench import _subproc, tasks
from bench._config import Config
from bench._measure import rss_kb
from bench._subproc import run_json
from flame_asgi import FlamePool, ProcessBackend

ESTIMATE_AT = 10_000


async def measure(cfg: Config) -> dict[str, Any]:
    """Run the idle-cost measurements in a fresh interpreter."""
    return await run_json("bench.idle", ["--quick"] if cfg.quick else [], 900.0)


async def _measure_here(cfg: Config) -> dict[str, Any]:
    counts = (10, 50, 150) if cfg.quick else (10, 50, 150, 300, 500)
    window = 5.0 if cfg.quick else 10.0
    async with FlamePool("bench-idle-warm", backend=ProcessBackend(), min=1, max=1) as pool:
        await pool.call(tasks.nothing)  # imports and first-use setup, before any figure
    points = [await _point(n, window) for n in counts]
    return {"available": True, "window_s": window, "points": points, "fit": _fits(points)}


async def _point(count: int, window: float) -> dict[str, Any]:
    before_kb = rss_kb()
    started = time.perf_counter()
    async with FlamePool("bench-idle", backend=ProcessBackend(), min=count, max=count, max_concurrency=1,
                         idle_shutdown_after=None, boot_timeout=300.0) as pool:
        boot_s = time.perf_counter() - started
        await asyncio.gather(*(pool.call(tasks.nothing) for _ in range(count)))
        pids = [r.handle.proc.pid for r in pool._runners]  # bench-only peek: ProcessBackend handles
        await asyncio.sleep(3.0)  # boots and first calls settle
        rss_with_kb = rss_kb()
        parent_cpu, parent_ctx = time.process_time(), _ctx_switches(os.getpid())
        runner_cpu, runner_ctx = _cpu_seconds(pids), sum(_ctx_switches(p) for p in pids)
        template = _fork_server_pids(pool)
        template_cpu, template_ctx = _cpu_seconds(template), sum(_ctx_switches(p) for p in template)
        t0 = time.perf_counter()
        await asyncio.sleep(window)
        elapsed = time.perf_counter() - t0
        parent_share = (time.process_time() - parent_cpu) / elapsed
        runners_share = (_cpu_seconds(pids) - runner_cpu) / elapsed
        template_share = (_cpu_seconds(template) - template_cpu) / elapsed
        template_wakeups = (sum(_ctx_switches(p) for p in template) - template_ctx) / elapsed
        parent_wakeups = (_ctx_switches(os.getpid()) - parent_ctx) / elapsed
        runner_wakeups = (sum(_ctx_switches(p) for p in pids) - runner_ctx) / elapsed
        pss = [_pss_kb(p) for p in pids]
        alive = len(pool.stats().runners)
    return {
        "runners": count, "alive": alive, "boot_s": round(boot_s, 2),
        "parent_cpu_pct": round(parent_share * 100, 2), "runners_cpu_pct": round(runners_share * 100, 2),
        "parent_wakeups_per_s": round(parent_wakeups, 1),
        "fork_server_cpu_pct": round(template_share * 100, 3), "fork_server_wakeups_per_s": round(template_wakeups, 1),
        "wakeups_per_runner_per_s": round(runner_wakeups / count, 2),
        "parent_rss_per_runner_kb": round((rss_with_kb - before_kb) / count, 1),
        "runner_pss_kb": round(sum(pss) / len(pss), 1),
    }


def _fits(points: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, unit in (("parent_cpu_pct", "% of a core"), ("runners_cpu_pct", "% of a core")):
        a, b = _line([p["runners"] for p in points], [p[key] for p in points])
        out[key] = {"fixed": round(a, 3), "per_runner": round(b, 4), "unit": unit,
                    "at_10000": round(a + b * ESTIMATE_AT, 1),
                    "formula": f"{a:.3f} + {b:.4f} x N {unit}"}
    rss = sum(p["parent_rss_per_runner_kb"] for p in points[1:]) / max(1, len(points) - 1)
    pss = sum(p["runner_pss_kb"] for p in points) / len(points)
    out["memory"] = {"parent_rss_per_runner_kb": round(rss, 1), "runner_pss_kb": round(pss, 1),
                     "at_10000_gb": round((rss + pss) * ESTIMATE_AT / 1024 / 1024, 1),
                     "formula": f"N x ({rss:.0f} KB in the parent + {pss:.0f} KB per runner)"}
    return out


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def _fork_server_pids(pool: FlamePool) -> list[int]:
    """The fork server's pid (bench-only peek), or none when the backend booted fresh
    interpreters instead: its figures are then 0."""
    server = getattr(pool.backend, "_forkserver", None)
    proc = getattr(server, "_proc", None)
    return [proc.pid] if proc is not None else []


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of every thread of ``pids``, from ``/proc/PID/task/TID/schedstat`` (ns).

    Not ``utime + stime`` of ``/proc/PID/stat``: those are whole clock ticks (10 ms), and a
    runner that idles well uses less than one in a window, so 150 of them read as 0.0 %.
    """
    total = 0
    for pid in pids:
        try:
            tasks_ = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks_:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def _ctx_switches(pid: int) -> int:
    return _proc_number(f"/proc/{pid}/status", "voluntary_ctxt_switches:")


def _pss_kb(pid: int) -> int:
    return _proc_number(f"/proc/{pid}/smaps_rollup", "Pss:")


def _proc_number(path: str, key: str) -> int:
    """The number after ``key`` in a ``/proc`` file, 0 if the process is gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    _subproc.main(_measure_here)
