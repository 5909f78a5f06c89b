"""Functions the reliability tests run on runners. They live in an importable module so
that a ProcessBackend runner (a separate interpreter) unpickles them by reference."""

from __future__ import annotations

import asyncio
import os
import pathlib
import time


def pid() -> int:
    return os.getpid()


def square(x: int) -> int:
    return x * x


async def touch_after(seconds: float, path: str, started: str | None = None) -> str:
    """Mark the start, sleep (cancellably), then leave a side effect at ``path``."""
    if started:
        pathlib.Path(started).touch()
    await asyncio.sleep(seconds)
    pathlib.Path(path).touch()
    return "touched"


async def hold(started: str) -> str:
    """Mark the start, then wait until cancelled or the runner dies."""
    pathlib.Path(started).touch()
    await asyncio.sleep(3600)
    return "never"


def blocked_in_c(seconds: float, started: str, path: str) -> str:
    """Sync code blocked in C (``time.sleep``): cancellation cannot interrupt it."""
    pathlib.Path(started).touch()
    time.sleep(seconds)
    pathlib.Path(path).touch()
    return "slept"


def allocate(mib: int) -> int:
    """Allocate and touch ``mib`` MiB, as a leaky model or a huge frame would."""
    block = bytearray(mib * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page: RSS grows, not just address space
        block[i] = 1
    return len(block)


def exit_now(code: int) -> None:
    os._exit(code)


def spin(seconds: float, started: str, path: str) -> str:
    """Pure-Python busy loop: a cancelled call is interrupted between bytecodes."""
    pathlib.Path(started).touch()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    pathlib.Path(path).touch()
    return "spun"


async def wait_for(gate: str, started: str) -> str:
    """Mark the start, then wait (cancellably) until the file ``gate`` exists."""
    pathlib.Path(started).touch()
    while not os.path.exists(gate):
        await asyncio.sleep(0.01)
    return "opened"


def describe_self() -> str:
    """What a runner shows of itself: parent() and its health body."""
    from flame_asgi import parent

    return f"{parent()!r} {parent()}"


async def asquare(x: int) -> int:
    await asyncio.sleep(0.001)
    return x * x


def square_logged(x: int, log_dir: str) -> int:
    """``square``, recording each execution's start (value, wall time) in this runner's own log."""
    with open(os.path.join(log_dir, f"runs.{os.getpid()}"), "a") as f:
        f.write(f"{x} {time.time()!r}\n")
    return x * x
