"""Run one part of the benchmark in a fresh interpreter and read back its JSON.

Used for the peers (Ray and Dask start clusters, threads and shared memory that should
not share a process with the pool being measured) and for memory (a clean heap). A part
that fails or overruns is recorded as unavailable, with the reason, instead of failing
the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from bench import _proc
from bench._measure import unavailable


async def run_json(module: str, args: list[str], timeout: float) -> dict[str, Any]:
    """``python -m module *args --out FILE``; returns FILE's JSON or an ``unavailable`` record."""
    fd, path = tempfile.mkstemp(prefix="flame-bench-", suffix=".json")
    os.close(fd)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, "--out", path, env=env, start_new_session=True,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        _kill_session(proc.pid)
        await proc.wait()
        return unavailable(f"{module} did not finish within {timeout:g} s")
    finally:
        _kill_session(proc.pid)  # whatever it left behind (Ray's raylet and workers, Dask's nannies)
    try:
        with open(path) as f:
            result: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        lines = output.decode(errors="replace").strip().splitlines()
        last = lines[-1].strip() if lines else "(no output)"  # a traceback's last line names the error
        return unavailable(f"{module} exited with code {proc.returncode}: {last}")
    finally:
        os.unlink(path)
    return result


def _kill_session(sid: int) -> None:
    """SIGKILL every process in session ``sid`` (started with ``start_new_session``): the
    subprocess and all it spawned, even those in process groups of their own (Ray's workers)."""
    for pid, fields in _proc.stats():
        if int(fields[3]) == sid:  # fields: state, ppid, pgrp, session, ...
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f)


def main(measure_here: Callable[[Any], Awaitable[dict[str, Any]]]) -> None:
    """The ``python -m bench.<family> [--quick] --out FILE`` entry of a family that
    ``run_json`` runs in a fresh interpreter: measure, write the JSON."""
    from bench._config import Config

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    write_json(args.out, asyncio.run(measure_here(Config.make(args.quick))))
