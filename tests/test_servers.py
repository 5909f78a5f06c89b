"""Multi-process servers: each worker has its own pools (``max`` is per worker), visible
in ``stats().pid``; every runner stops with its worker, and nothing is left behind."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.servers import serve


async def _seen_workers(url: str, want: int, budget: float = 30.0) -> dict[int, set[int]]:
    """Call until ``want`` different workers answered; map each worker pid to its runners."""
    seen: dict[int, set[int]] = {}
    deadline = time.monotonic() + budget
    while len(seen) < want and time.monotonic() < deadline:
        async def one() -> dict[str, int]:
            # A new connection per request: the kernel hands each to whichever worker accepts.
            async with httpx.AsyncClient(timeout=30) as client:
                return (await client.get(url + "/where")).json()  # type: ignore[no-any-return]

        for got in await asyncio.gather(*(one() for _ in range(8))):
            assert got["stats_pid"] == got["worker"]  # stats() says whose pool this is
            assert got["runners"] == 1  # max=1 per worker: each worker booted its own runner
            seen.setdefault(got["worker"], set()).add(got["runner"])
    return seen


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn", "hypercorn"])
async def test_each_worker_has_its_own_pool_and_its_runners_die_with_it(server: str) -> None:
    with serve("tests.apps.workers_app:app", server=server, workers=2, probe="/docs") as (url, _proc, watched):
        seen = await _seen_workers(url, 2)
        assert len(seen) == 2, f"only workers {sorted(seen)} answered"
        runners = [pid for pids in seen.values() for pid in pids]
        assert all(len(pids) == 1 for pids in seen.values())  # one warm runner per worker
        assert len(set(runners)) == 2 and not set(runners) & set(seen)
        watched.update(runners, seen)
    # serve() checked that the workers, their fork servers and their runners are all gone.
