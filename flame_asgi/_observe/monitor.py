"""What the pool view shows beyond ``pool.stats()``, kept from pool events (``subscribe``).

One ``Monitor`` per process, subscribed the first time a pool view is created (never at
import: an app that mounts no view pays nothing). Per pool name it keeps the runners
being booted, when each runner came up and how long its boot took, recent boot times,
finished calls per second, the recent failures with their reasons, and the pool's size
over time for the chart. Everything is bounded: a view left open for a month holds what
it held after ten minutes.

Handlers run where the event happens (mostly the event loop), so every method here is
quick: it appends to a deque or a dict and wakes the open views.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from flame_asgi._observe import telemetry

HISTORY_SECONDS = 600.0  # how far back the chart goes
RATE_WINDOW = 10  # seconds of finished calls averaged into calls per second
FAILURES_KEPT = 20
BOOTS_KEPT = 50
LOST = frozenset({"crash", "oom", "unreachable", "lost"})  # runner.stop reasons that are failures


@dataclasses.dataclass
class Failure:
    at: float  # wall-clock time
    what: str  # "boot failed", "runner lost", "call error", "call timeout"...
    runner: str | None
    reason: str  # a short word or type name
    detail: str  # the full text, as the pool or backend said it

    def json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PoolRecord:
    """What the events said about one pool (by name) in this process."""

    name: str
    booting: dict[str, float] = dataclasses.field(default_factory=dict)  # runner -> boot began (wall)
    up: dict[str, tuple[float, float | None]] = dataclasses.field(default_factory=dict)  # runner -> (since, boot s)
    boot_times: deque[float] = dataclasses.field(default_factory=lambda: deque(maxlen=BOOTS_KEPT))
    failures: deque[Failure] = dataclasses.field(default_factory=lambda: deque(maxlen=FAILURES_KEPT))
    calls: deque[list[int]] = dataclasses.field(default_factory=lambda: deque(maxlen=RATE_WINDOW + 1))
    calls_total: int = 0
    failed_total: int = 0
    # (wall time, runners, booting, waiting): a point at every boot and stop, and at each push.
    history: deque[tuple[float, int, int, int]] = dataclasses.field(default_factory=lambda: deque(maxlen=4000))

    def count_call(self, failed: bool) -> None:
        second = int(time.monotonic())
        if self.calls and self.calls[-1][0] == second:
            self.calls[-1][1] += 1
        else:
            self.calls.append([second, 1])
        self.calls_total += 1
        self.failed_total += failed

    def calls_per_second(self) -> float:
        now = int(time.monotonic())
        # Whole seconds only: the current one is still filling.
        done = sum(n for second, n in self.calls if now - RATE_WINDOW <= second < now)
        return done / RATE_WINDOW

    def sample(self, runners: int, booting: int, waiting: int, *, force: bool = False) -> None:
        now = time.time()
        point = (now, runners, booting, waiting)
        if self.history and not force and self.history[-1][1:] == point[1:] and now - self.history[-1][0] < 1.0:
            return
        self.history.append(point)
        while self.history and self.history[0][0] < now - HISTORY_SECONDS:
            self.history.popleft()


class Monitor:
    """The process's pool records, fed by events; open views register a wake-up here."""

    def __init__(self) -> None:
        self.pools: dict[str, PoolRecord] = {}
        self.started = time.time()
        self._watchers: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}
        telemetry.subscribe(self.on_event)  # for the life of the process: views come and go

    def record(self, pool: str) -> PoolRecord:
        record = self.pools.get(pool)
        if record is None:
            record = self.pools[pool] = PoolRecord(pool)
        return record

    def watch(self, changed: asyncio.Event) -> Callable[[], None]:
        """Set ``changed`` (on its own loop) whenever a pool event arrives; returns the undo."""
        key = id(changed)
        self._watchers[key] = (asyncio.get_running_loop(), changed)

        def unwatch() -> None:
            self._watchers.pop(key, None)

        return unwatch

    def on_event(self, name: str, f: dict[str, Any]) -> None:
        pool = f.get("pool")
        if not isinstance(pool, str) or name == "call.start":
            return  # a call's start changes nothing shown; its end does
        record = self.record(pool)
        now = time.time()
        runner = str(f.get("runner"))
        if name == "runner.boot.start":
            record.booting[runner] = now
        elif name == "runner.boot.end":
            record.booting.pop(runner, None)
            if f["ok"]:
                record.up[runner] = (now, f["duration"])
                if f["duration"] is not None:
                    record.boot_times.append(f["duration"])
            elif f["reason"] != "cancelled":  # cut short by the pool closing: no failure
                record.failures.append(Failure(now, "boot failed", runner, str(f["reason"]), str(f["error"])))
        elif name == "runner.stop":
            record.up.pop(runner, None)
            if f["reason"] in LOST:
                record.failures.append(Failure(now, "runner lost", runner, f["reason"], str(f["detail"])))
        elif name in ("call.end", "call.exception"):
            failed = name == "call.exception" and f["outcome"] != "cancelled"
            record.count_call(failed)
            if failed:
                record.failures.append(Failure(now, f"{f['kind']} {f['outcome']}", f["runner"], str(f["error"]),
                                               f"{f['function']} ({f['outcome']})"))
            self._wake()
            return
        else:
            return
        self._sample(pool, record)
        self._wake()

    def _sample(self, name: str, record: PoolRecord) -> None:
        for pool in telemetry.pools():
            if pool.name == name:
                s = pool.stats()
                record.sample(len(s.runners), s.booting, s.waiting, force=True)
                return

    def _wake(self) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, changed in list(self._watchers.values()):
            if loop is running:
                changed.set()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(changed.set)  # an event from another thread


_lock = threading.Lock()
_monitor: Monitor | None = None


def monitor() -> Monitor:
    """The process's monitor, subscribing it on first use."""
    global _monitor
    with _lock:
        if _monitor is None:
            _monitor = Monitor()
        return _monitor
