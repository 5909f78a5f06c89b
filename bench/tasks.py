"""What the runners (and the peers' workers) execute. Importable by every process."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Callable, Iterator
from typing import Any


def nothing() -> None:
    """A module-level function: pickled by reference, the cheapest thing to call."""


async def nothing_async() -> None:
    """An async function: runs on the runner's event loop, no worker-thread hop."""


def make_closure(value: int) -> Callable[[], int]:
    """A trivial closure: pickled by value on every call, like most real ``call`` sites."""
    return lambda: value


def echo(data: bytes) -> bytes:
    return data


async def drain(data: AsyncIterable[bytes]) -> int:
    """Read a ``RemoteBytes`` to its end; returns the byte count (no other work per chunk)."""
    total = 0
    async for chunk in data:
        total += len(chunk)
    return total


def produce(size: int, chunk: int = 1 << 20) -> Any:
    """An ``Upload`` of ``size`` bytes made on the runner chunk by chunk (never held whole)."""
    from flame_asgi import Upload

    block = b"\x5a" * chunk

    def chunks() -> Iterator[bytes]:
        left = size
        while left > 0:
            yield block if left >= chunk else block[:left]
            left -= chunk

    return Upload(chunks(), chunk_size=chunk)


def identity(value: int) -> int:
    return value


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def spin(iterations: int) -> int:
    """CPU-bound pure Python, holding the GIL throughout."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def calibrate_spin(target_ms: float) -> int:
    """The ``spin`` iteration count that takes about ``target_ms`` on this machine."""
    n = 200_000
    spin(n)  # warm up
    best = min(_timed(spin, n) for _ in range(7))  # the fastest run: least disturbed by neighbours
    return max(1, int(n * target_ms / 1000 / best))


def _timed(fn: Callable[[int], object], arg: int) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start
