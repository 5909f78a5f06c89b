"""Streams: ``Upload`` to a runner and a ``RemoteBytes`` back, in MB/s, with the parent's peak memory.

- ``upload``: ``pool.call(drain, Upload(path))`` with a file of ``stream_mb`` MB (decimal)
  that the runner reads chunk by chunk to its end: MB/s = size / time to the result.
- ``download``: the runner returns ``Upload(generator)`` of the same size, made chunk by
  chunk there; the parent reads it to the end: MB/s = size / time from the call to the
  last chunk.
- ``parent_peak_growth_mb``: the parent's peak RSS (VmHWM, reset just before) over both
  transfers, minus its RSS before them. Bounded means a few chunks in flight, not the
  data: the target allows 64 MB while the data moved is twice ``stream_mb``.

ProcessBackend, default chunk size (1 MiB), best of the rounds. Runs in a fresh
interpreter (``python -m bench.streams``) so that the peak is this measurement's own.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from bench import _subproc, tasks
from bench._config import MB, Config
from bench._measure import best_rate, now
from bench._subproc import run_json
from flame_asgi import FlamePool, ProcessBackend, Upload


async def measure(cfg: Config) -> dict[str, Any]:
    """Run the stream measurements in a fresh interpreter."""
    return await run_json("bench.streams", ["--quick"] if cfg.quick else [], 180.0)


async def _measure_here(cfg: Config) -> dict[str, Any]:
    size = cfg.stream_mb * MB
    with tempfile.TemporaryDirectory(prefix="flame-bench-") as tmp:
        path = os.path.join(tmp, "upload.bin")
        with open(path, "wb") as f:
            for _ in range(cfg.stream_mb):
                f.write(os.urandom(MB))
        async with FlamePool("bench-streams", backend=ProcessBackend(), min=1, max=1, timeout=120.0) as pool:
            await pool.call(tasks.nothing)
            up: list[float] = []
            down: list[float] = []
            _reset_peak()
            before = _status_kb("VmRSS")
            for _ in range(cfg.stream_rounds):
                start = now()
                got = await pool.call(tasks.drain, Upload(path))
                up.append(cfg.stream_mb / (now() - start))
                if got != size:
                    raise AssertionError(f"the runner read {got} bytes of a {size}-byte upload")
                start = now()
                back = await pool.call(tasks.produce, size)
                read = 0
                async for chunk in back:
                    read += len(chunk)
                down.append(cfg.stream_mb / (now() - start))
                if read != size:
                    raise AssertionError(f"read {read} bytes of a {size}-byte download")
            growth = (_status_kb("VmHWM") - before) / 1024
    return {"available": True, "size_mb": cfg.stream_mb, "rounds": cfg.stream_rounds,
            "upload": best_rate(up, "mb_per_s"), "download": best_rate(down, "mb_per_s"),
            "parent_rss_before_mb": round(before / 1024, 1), "parent_peak_growth_mb": round(growth, 1)}


def _reset_peak() -> None:
    # Freed buffers go back to the OS, so RSS afterwards proves nothing: measure the peak
    # (VmHWM), reset to the current RSS here (proc(5), clear_refs "5").
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


if __name__ == "__main__":
    _subproc.main(_measure_here)
