"""The pool's bookkeeping as plain synchronous code: who gets which slot, what to boot.

Nothing here awaits or does I/O. Each method changes the state and returns what the
pool must now do (boot runners, hand slots to waiters, stop a runner); the pool does
that I/O afterwards. This keeps every scaling decision testable on its own.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Generic, TypeVar

W = TypeVar("W")  # a waiter: whatever the pool uses to wake a queued caller


@dataclasses.dataclass
class Slots:
    """One booted runner's capacity."""

    id: str
    capacity: int
    active: int = 0
    retired: bool = False  # takes no new work (single use spent, recycling, stopping)
    idle_since: float | None = None


@dataclasses.dataclass
class Decision(Generic[W]):
    """What the pool must do after a state change."""

    boot: int = 0  # how many runners to start booting now
    grants: list[tuple[W, str]] = dataclasses.field(default_factory=list)  # wake waiter with runner id
    stop: list[str] = dataclasses.field(default_factory=list)  # runners to stop (no work left)


class PoolState(Generic[W]):
    def __init__(self, *, min: int, max: int, max_concurrency: int, single_use: bool) -> None:
        self.min = min
        self.max = max
        self.capacity = 1 if single_use else max_concurrency
        self.single_use = single_use
        self.runners: dict[str, Slots] = {}
        self.booting = 0
        self.waiters: deque[W] = deque()
        self.last_boot_error: BaseException | None = None

    # -- callers ------------------------------------------------------------------------
    def acquire(self, waiter: W, now: float) -> tuple[str | None, Decision[W]]:
        """Take a slot on the least-loaded runner, or queue ``waiter`` (FIFO)."""
        if not self.waiters:
            rid = self._take(now)
            if rid is not None:
                return rid, Decision()
        self.waiters.append(waiter)
        return None, Decision(boot=self._boots_needed())

    def take_on(self, rid: str) -> bool:
        """Take one more slot on runner ``rid`` (a lease's concurrent call), if it has room."""
        slots = self.runners.get(rid)
        if slots is None or slots.retired or slots.active >= slots.capacity:
            return False
        slots.active += 1
        slots.idle_since = None
        return True

    def forget_waiter(self, waiter: W) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def release(self, rid: str, now: float) -> Decision[W]:
        slots = self.runners.get(rid)
        if slots is None:
            return Decision()
        slots.active -= 1
        if slots.active == 0:
            slots.idle_since = now
        decision: Decision[W] = Decision(grants=self._serve_waiters(now))
        if slots.retired and slots.active == 0:
            decision.stop.append(rid)
        return decision

    # -- runners ------------------------------------------------------------------------
    def boot_started(self) -> None:
        self.booting += 1

    def boot_succeeded(self, rid: str, now: float) -> Decision[W]:
        self.booting -= 1
        self.last_boot_error = None
        self.runners[rid] = Slots(rid, self.capacity, idle_since=now)
        return Decision(grants=self._serve_waiters(now))

    def boot_failed(self, error: BaseException) -> Decision[W]:
        self.booting -= 1
        self.last_boot_error = error
        return Decision(boot=self._boots_needed())

    def retire(self, rid: str) -> Decision[W]:
        """Take no new work on ``rid``; stop it once idle, and boot a replacement if needed."""
        slots = self.runners.get(rid)
        if slots is None or slots.retired:
            return Decision()
        slots.retired = True
        return Decision(boot=self._boots_needed(), stop=[rid] if slots.active == 0 else [])

    def fence(self, rid: str) -> None:
        """``rid``'s channel closed: give it no new work (``remove`` follows once the
        backend has said how it ended)."""
        slots = self.runners.get(rid)
        if slots is not None:
            slots.retired = True

    def remove(self, rid: str) -> Decision[W]:
        """The runner is gone (stopped or lost)."""
        self.runners.pop(rid, None)
        return Decision(boot=self._boots_needed())

    def idle_runners(self, now: float, idle_after: float | None, min_idle_after: float | None) -> list[str]:
        """Runners idle past their threshold; the ``min`` runners use ``min_idle_after``."""
        live = [s for s in self.runners.values() if not s.retired]
        surplus = len(live) + self.booting - self.min
        # Stop the longest-idle first, so the ones that keep working keep their warmth.
        idle = sorted((s for s in live if s.active == 0 and s.idle_since is not None),
                      key=lambda s: s.idle_since if s.idle_since is not None else 0.0)
        out = []
        for slots in idle:
            threshold = idle_after if surplus > 0 else min_idle_after
            assert slots.idle_since is not None
            if threshold is not None and now - slots.idle_since >= threshold:
                out.append(slots.id)
                slots.retired = True
                surplus -= 1
        return out

    # -- internals ----------------------------------------------------------------------
    def _take(self, now: float) -> str | None:
        best: Slots | None = None
        for slots in self.runners.values():
            if not slots.retired and slots.active < slots.capacity:
                if best is None or slots.active < best.active:
                    best = slots
        if best is None:
            return None
        best.active += 1
        best.idle_since = None
        if self.single_use:
            best.retired = True  # one call per runner: it stops when that call ends
        return best.id

    def _serve_waiters(self, now: float) -> list[tuple[W, str]]:
        grants = []
        while self.waiters:
            rid = self._take(now)
            if rid is None:
                break
            grants.append((self.waiters.popleft(), rid))
        return grants

    def _boots_needed(self) -> int:
        """Boot for waiters that booting runners will not absorb, never past ``max``."""
        # Retired runners still run until their last call ends: they count against max.
        room = self.max - len(self.runners) - self.booting
        uncovered = len(self.waiters) - self.booting * self.capacity
        if room <= 0 or uncovered <= 0:
            return 0
        return min(room, -(-uncovered // self.capacity))
