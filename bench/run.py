"""``python -m bench [--quick] [--out DIR]``: run every benchmark, write the report.

Families run one after another (never two at once: they share the CPUs), ours first,
then memory and the peers in fresh interpreters. Every target is then reported on stderr
as met, not met, or not measured (with the reason), and in ``report.md``. Writes ``report.json``, ``report.md``
and ``report.png`` to DIR (default ``bench/results/<timestamp>/``) and prints the JSON
path as the last line of stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import flame_asgi
from bench import (
    burst,
    cold,
    container,
    fanout,
    floors,
    idle,
    kubernetes,
    latency,
    markdown,
    memory,
    payload,
    peers,
    plot,
    pool_sim,
    report,
    scaleout,
    streams,
    tasks,
    warm,
)
from bench import throughput as throughput_
from bench._config import Config
from bench._measure import now, unavailable

RESULTS = pathlib.Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer iterations: about five minutes (with Ray and Dask installed)")
    parser.add_argument("--out", type=pathlib.Path, help="output directory (default bench/results/<timestamp>)")
    args = parser.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / stamp
    out.mkdir(parents=True, exist_ok=True)
    full = asyncio.run(run(Config.make(args.quick), stamp))
    json_path = out / "report.json"
    json_path.write_text(json.dumps(full, indent=1) + "\n")
    for name, write in (("report.md", lambda p: p.write_text(markdown.render(full))),
                        ("report.png", lambda p: plot.render(full, str(p)))):
        try:
            write(out / name)
        except Exception as exc:  # the JSON is written: a broken table or plot must not hide it
            _progress(f"could not write {name}: {exc!r}")
    for goal in full["targets"]:
        _progress(f"target {goal['id']}: {markdown.verdict(goal)}")
    print(json_path.resolve())


async def run(cfg: Config, stamp: str) -> dict[str, Any]:
    started = now()
    durations: dict[str, float] = {}
    load_before = os.getloadavg()

    async def step(name: str, fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        _progress(f"{name}...")
        t = now()
        try:
            result = await fn()
        except Exception as exc:  # one broken family must not cost the whole run
            _progress(f"{name} failed: {exc!r}")
            result = unavailable(f"{type(exc).__name__}: {exc}")
        durations[name] = round(now() - t, 1)
        _progress(f"{name}: {durations[name]} s")
        return result

    deadline = None if cfg.total_budget_s is None else started + cfg.total_budget_s
    spin = tasks.calibrate_spin(cfg.spin_ms)
    raw = {
        "floors": await step("floors", lambda: floors.measure(cfg)),
        "latency": await step("latency", lambda: latency.measure(cfg)),
        "throughput": await step("throughput", lambda: throughput_.measure(cfg)),
        "cold": await step("cold", lambda: cold.measure(cfg)),
        "scaleout": await step("scaleout", lambda: scaleout.measure(cfg, spin)),
        "payload": await step("payload", lambda: payload.measure(cfg)),
        "burst": await step("burst", lambda: burst.measure(cfg)),
        "docker": await step("docker", lambda: container.measure(cfg)),
        "warm": await step("warm", lambda: warm.measure(cfg)),
        "kubernetes": await step("kubernetes", lambda: kubernetes.measure(cfg)),
        "streams": await step("streams", lambda: streams.measure(cfg)),
        "pool_sim": await step("pool_sim", lambda: pool_sim.measure(cfg)),
        "memory": await step("memory", lambda: memory.measure(cfg)),
        "idle": await step("idle", lambda: idle.measure(cfg)),
        "fanout": await step("fanout", lambda: fanout.measure(cfg)),
        "peers": await step("peers", lambda: peers.measure(cfg, spin, deadline)),
    }
    measurements = report.build(raw)
    meta = {
        "timestamp": stamp, "quick": cfg.quick, "python": platform.python_version(),
        "platform": platform.platform(), "cpus": os.cpu_count(), "flame_asgi": flame_asgi.__version__,
        "git": _git_describe(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "duration_s": round(now() - started, 1), "step_durations_s": durations, "config": cfg.as_dict(),
    }
    return {"meta": meta, "targets": report.targets(measurements), "measurements": measurements}


def _git_describe() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "flame_asgi"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
