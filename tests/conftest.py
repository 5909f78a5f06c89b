from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator

import pytest

from flame_asgi import Backend, LocalBackend, ProcessBackend

BackendFactory = Callable[[], Backend]


@pytest.fixture(params=["local", "process"])
def backend(request: pytest.FixtureRequest) -> BackendFactory:
    """Build a fresh backend of each kind: every pool scenario runs on both."""
    if request.param == "local":
        return lambda: LocalBackend(heartbeat_interval=0.2, heartbeat_timeout=3.0)
    return lambda: ProcessBackend(heartbeat_interval=0.2, heartbeat_timeout=3.0)


def child_pids() -> set[int]:
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            found.add(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every test must reap every runner it started."""
    before = child_pids()
    yield
    deadline = time.monotonic() + 5
    while child_pids() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child_pids() - before == set(), "runner processes left behind"


async def until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
