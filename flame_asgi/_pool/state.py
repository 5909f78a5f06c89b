"""The pool's bookkeeping as plain synchronous code: who gets which slot, what to boot.

Nothing here awaits or does I/O. Each method changes the state and returns what the
pool must now do (boot runners, hand slots to waiters, stop a runner); the pool does
that I/O afterwards. This keeps every scaling decision testable on its own.

Every decision costs O(log n) amortized in the number of runners, and O(1) in the
number of waiting callers, so a pool with thousands of runners and a million queued
calls decides as fast as a small one (``bench/pool_sim.py`` measures it):

- the runner for the next call comes from a heap keyed (active calls, boot order), so
  the least-loaded runner is on top and ties go to the one booted first;
- idle shutdown reads a heap keyed (idle since, boot order), longest idle on top;
- waiters sit in an ``OrderedDict``: FIFO pops and a cancelled caller's removal are O(1);
- ``warm`` spares are one counter (``spare``: live runners with nothing on them), kept
  up to date at each change of a runner's work, so topping them up is O(1) too.

Both heaps are lazy: a change to a runner pushes a fresh entry and leaves the old one in
place; an entry that no longer matches its runner is dropped when it reaches the top,
and once the heaps hold more than four entries per runner (plus slack) they are rebuilt
from the runners, which the pushes since the last rebuild pay for.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import OrderedDict
from typing import Generic, TypeVar

W = TypeVar("W")  # a waiter: whatever the pool uses to wake a queued caller

_SLACK = 64  # stale heap entries tolerated beyond four per runner before a rebuild


@dataclasses.dataclass
class Capacity:
    """One booted runner's capacity."""

    id: str
    capacity: int
    active: int = 0
    retired: bool = False  # takes no new work (single use spent, recycling, stopping)
    idle_since: float | None = None
    holds: int = 0  # resources the parent still holds on this runner (keep it alive, use no slot)
    order: int = 0  # boot order: breaks ties between equally loaded or equally idle runners
    asked: bool = False  # retired by ``idle_runners`` only: ``keep`` may take it back


@dataclasses.dataclass
class Decision(Generic[W]):
    """What the pool must do after a state change."""

    boot: int = 0  # how many runners to start booting now
    warm: int = 0  # of those, how many are spares no caller waits for (``warm``)
    grants: list[tuple[W, str]] = dataclasses.field(default_factory=list)  # wake waiter with runner id
    stop: list[str] = dataclasses.field(default_factory=list)  # runners to stop (no work left)


class PoolState(Generic[W]):
    """One pool's runners and queue. ``warm``: while the pool has had a call within
    ``warm_for`` seconds, keep that many spare runners (live, nothing on them) beyond the
    busy ones, never past ``max``; a quiet pool lets them idle away like any runner."""

    def __init__(self, *, min: int, max: int, max_concurrency: int, single_use: bool, warm: int = 0,
                 warm_for: float | None = None) -> None:
        self.min = min
        self.max = max
        self.warm = warm
        self.warm_for = warm_for  # the pool is busy while its last call is younger than this (None: forever)
        self.spare = 0  # live runners with no call and no hold on them
        self._last_call: float | None = None
        self.capacity = 1 if single_use else max_concurrency
        self.single_use = single_use
        self.runners: dict[str, Capacity] = {}
        self.booting = 0
        # Keys only (values unused): insertion order is the queue's order.
        self.waiters: OrderedDict[W, None] = OrderedDict()
        self.last_boot_error: BaseException | None = None
        self._live = 0  # runners not retired
        self._order = itertools.count()
        self._free: list[tuple[int, int, str]] = []  # (active, order, id): runners that may take a call
        self._idle: list[tuple[float, int, str]] = []  # (idle_since, order, id): idle-shutdown candidates

    # -- callers ------------------------------------------------------------------------
    def acquire(self, waiter: W, now: float) -> tuple[str | None, Decision[W]]:
        """Take a slot on the least-loaded runner, or queue ``waiter`` (FIFO)."""
        self._last_call = now
        if not self.waiters:
            rid = self._take(now)
            if rid is not None:
                # A spare just went to work: boot another, so the next caller finds one too.
                return rid, self._boots(Decision(), now) if self.warm else Decision()
        self.waiters[waiter] = None
        return None, self._boots(Decision(), now)

    def take_on(self, rid: str) -> bool:
        """Take one more slot on runner ``rid`` (a lease's concurrent call), if it has room."""
        slots = self.runners.get(rid)
        if slots is None or slots.retired or slots.active >= slots.capacity:
            return False
        self.spare -= self._is_spare(slots)
        slots.active += 1
        slots.idle_since = None
        self._push_free(slots)
        return True

    def forget_waiter(self, waiter: W) -> None:
        self.waiters.pop(waiter, None)

    def take_waiters(self) -> list[W]:
        """Every queued caller, in order, and none left queued (the pool closes, or a boot
        failed in a way no retry fixes): the pool wakes them with the reason."""
        waiters = list(self.waiters)
        self.waiters.clear()
        return waiters

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    def release(self, rid: str, now: float) -> Decision[W]:
        slots = self.runners.get(rid)
        if slots is None:
            return Decision()
        slots.active -= 1
        self.spare += self._is_spare(slots)
        self._push_free(slots)
        if slots.active == 0 and slots.holds == 0:
            self._idle_from(slots, now)
        decision: Decision[W] = Decision(grants=self._serve_waiters(now))
        if self.warm and decision.grants:
            self._boots(decision, now)
        if self._spent(slots):
            decision.stop.append(rid)
        return decision

    # -- resources the parent holds on a runner -----------------------------------------
    def hold(self, rid: str) -> bool:
        """A resource on ``rid`` is still held: keep the runner, as an active call would.

        A hold uses no call slot and works on a retired runner too (its last call may
        have returned a stream still being read). False if ``rid`` is unknown."""
        slots = self.runners.get(rid)
        if slots is None:
            return False
        self.spare -= self._is_spare(slots)
        slots.holds += 1
        slots.idle_since = None
        return True

    def unhold(self, rid: str, now: float) -> Decision[W]:
        """Drop one hold on ``rid``: a retired runner with nothing left is stopped, a
        live one with nothing left starts its idle time now."""
        slots = self.runners.get(rid)
        if slots is None or slots.holds == 0:
            return Decision()
        slots.holds -= 1
        self.spare += self._is_spare(slots)
        if slots.active == 0 and slots.holds == 0:
            self._idle_from(slots, now)
            if slots.retired:
                return Decision(stop=[rid])
        return Decision()

    # -- runners ------------------------------------------------------------------------
    def boot_started(self) -> None:
        self.booting += 1

    def boot_succeeded(self, rid: str, now: float) -> Decision[W]:
        self.booting -= 1
        self.last_boot_error = None
        old = self.runners.get(rid)
        if old is not None and not old.retired:
            self._live -= 1
            self.spare -= self._is_spare(old)
        # A reused id keeps its place in the boot order, as it keeps its place in the dict.
        slots = Capacity(rid, self.capacity, order=next(self._order) if old is None else old.order)
        self.runners[rid] = slots
        self._live += 1
        self.spare += 1
        self._push_free(slots)
        self._idle_from(slots, now)
        decision: Decision[W] = Decision(grants=self._serve_waiters(now))
        if self.warm and decision.grants:
            self._boots(decision, now)
        return decision

    def boot_failed(self, error: BaseException) -> Decision[W]:
        self.booting -= 1
        self.last_boot_error = error
        return self._boots(Decision(), None)

    def retire(self, rid: str) -> Decision[W]:
        """Take no new work on ``rid``; stop it once idle, and boot a replacement if needed."""
        slots = self.runners.get(rid)
        if slots is None or slots.retired:
            if slots is not None:
                slots.asked = False  # being asked whether it may idle away: it stops either way
            return Decision()
        self._retire(slots)
        return self._boots(Decision(stop=[rid] if self._spent(slots) else []), None)

    def fence(self, rid: str) -> None:
        """``rid``'s channel closed: give it no new work (``remove`` follows once the
        backend has said how it ended)."""
        slots = self.runners.get(rid)
        if slots is not None:
            slots.asked = False
            if not slots.retired:
                self._retire(slots)

    def keep(self, rid: str, now: float) -> Decision[W]:
        """``rid``, returned by ``idle_runners``, declined to stop: it takes work again and
        its idle time starts over. If it was retired for another reason meanwhile
        (recycled, its channel closed), it stays retired and stops once nothing runs on it."""
        slots = self.runners.get(rid)
        if slots is None or not slots.retired:
            return Decision()
        if not slots.asked:
            return Decision(stop=[rid] if self._spent(slots) else [])
        slots.asked = False
        slots.retired = False
        self._live += 1
        self.spare += self._is_spare(slots)
        self._push_free(slots)
        if slots.active == 0 and slots.holds == 0:
            self._idle_from(slots, now)
        return Decision(grants=self._serve_waiters(now))

    def remove(self, rid: str) -> Decision[W]:
        """The runner is gone (stopped or lost)."""
        slots = self.runners.pop(rid, None)
        if slots is not None and not slots.retired:
            self._live -= 1
            self.spare -= self._is_spare(slots)
        return self._boots(Decision(), None)

    def idle_runners(self, now: float, idle_after: float | None, min_idle_after: float | None) -> list[str]:
        """Runners idle past their threshold, longest idle first (so the ones that keep
        working keep their warmth); the ``min`` runners use ``min_idle_after``. They take
        no new work from now on: the pool stops them, or ``keep`` takes one back."""
        surplus = self._live + self.booting - self.min
        # While the pool is busy its warm spares stay; once quiet they idle away like the rest.
        reapable = self.spare - (self.warm if self._busy(now) else 0)
        out: list[str] = []
        heap = self._idle
        while heap:
            since, order, rid = heap[0]
            slots = self.runners.get(rid)
            if slots is None or not self._is_idle_entry(slots, since, order):
                heapq.heappop(heap)
                continue
            if surplus > 0 and reapable <= 0:
                break  # the idle runners left are the warm spares
            threshold = idle_after if surplus > 0 else min_idle_after
            # The rest have idled for less: once this one is too fresh, so are they (the
            # threshold only changes when surplus reaches 0, and then stays).
            if threshold is None or now - since < threshold:
                break
            heapq.heappop(heap)
            out.append(rid)
            self._retire(slots)
            slots.asked = True
            surplus -= 1
            reapable -= 1
        return out

    # -- internals ----------------------------------------------------------------------
    def _take(self, now: float) -> str | None:
        heap = self._free
        while heap:
            active, order, rid = heap[0]
            slots = self.runners.get(rid)
            if (slots is None or slots.order != order or slots.active != active or slots.retired
                    or active >= slots.capacity):
                heapq.heappop(heap)  # stale: the runner moved on since this entry was pushed
                continue
            self.spare -= self._is_spare(slots)
            slots.active += 1
            slots.idle_since = None
            if self.single_use:
                self._retire(slots)  # one call per runner: it stops when that call ends
            if slots.retired or slots.active >= slots.capacity:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (slots.active, order, rid))
            return rid
        return None

    def _serve_waiters(self, now: float) -> list[tuple[W, str]]:
        grants = []
        while self.waiters:
            rid = self._take(now)
            if rid is None:
                break
            grants.append((self.waiters.popitem(last=False)[0], rid))
        return grants

    def _boots(self, decision: Decision[W], now: float | None) -> Decision[W]:
        """Boot for waiters that booting runners will not absorb, and, while the pool is
        busy, for the warm spares it lacks; never past ``max``. ``now`` is ``None`` where
        no call just happened (a runner stopped or failed to boot): spares are topped up
        by calls only, so a quiet pool never boots one to replace a spare that idled away."""
        # Retired runners still run until their last call ends: they count against max.
        room = self.max - len(self.runners) - self.booting
        if room <= 0:
            return decision
        for_waiters = -(-len(self.waiters) // self.capacity)  # runners the queue will fill
        uncovered = len(self.waiters) - self.booting * self.capacity
        demand = min(room, -(-uncovered // self.capacity) if uncovered > 0 else 0)
        spares = 0
        if self.warm and now is not None and self._busy(now):
            # Booting runners the queue will not fill are spares already on their way.
            coming = self.spare + max(0, self.booting - for_waiters)
            spares = min(room - demand, max(0, self.warm - coming))
        decision.boot, decision.warm = demand + spares, spares
        return decision

    def _busy(self, now: float) -> bool:
        """The pool has had a call within ``warm_for`` (and so keeps its warm spares)."""
        last = self._last_call
        return last is not None and (self.warm_for is None or now - last < self.warm_for)

    @property
    def warm_spares(self) -> int:
        """How many of the spare runners are the warm ones kept while busy (0 without ``warm``)."""
        return min(self.spare, self.warm)

    def warm_spares_at(self, now: float) -> int:
        """``warm_spares`` if the pool is busy at ``now``; a quiet pool's spares are just idle."""
        return self.warm_spares if self._busy(now) else 0

    def _retire(self, slots: Capacity) -> None:
        self.spare -= self._is_spare(slots)
        slots.retired = True  # its heap entries go stale with it
        self._live -= 1

    @staticmethod
    def _is_spare(slots: Capacity) -> int:
        """1 if ``slots`` is a live runner with nothing on it, else 0 (for ``spare``)."""
        return int(not slots.retired and slots.active == 0 and slots.holds == 0)

    @staticmethod
    def _spent(slots: Capacity) -> bool:
        return slots.retired and slots.active == 0 and slots.holds == 0

    @staticmethod
    def _is_idle_entry(slots: Capacity, since: float, order: int) -> bool:
        return (slots.order == order and slots.idle_since == since and not slots.retired
                and slots.active == 0 and slots.holds == 0)

    def _idle_from(self, slots: Capacity, now: float) -> None:
        slots.idle_since = now
        if not slots.retired:
            heapq.heappush(self._idle, (now, slots.order, slots.id))
            self._compact()

    def _push_free(self, slots: Capacity) -> None:
        if not slots.retired and slots.active < slots.capacity:
            heapq.heappush(self._free, (slots.active, slots.order, slots.id))
            self._compact()

    def _compact(self) -> None:
        if len(self._free) + len(self._idle) > 4 * len(self.runners) + _SLACK:
            self._rebuild()

    def _rebuild(self) -> None:
        """Drop every stale entry: O(n), paid for by the pushes since the last rebuild."""
        live = [s for s in self.runners.values() if not s.retired]
        self._free = [(s.active, s.order, s.id) for s in live if s.active < s.capacity]
        self._idle = [(s.idle_since, s.order, s.id) for s in live
                      if s.active == 0 and s.holds == 0 and s.idle_since is not None]
        heapq.heapify(self._free)
        heapq.heapify(self._idle)
