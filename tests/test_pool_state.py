"""PoolState alone: the scaling decisions, without any I/O."""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flame_asgi._pool.state import Decision, PoolState


def test_least_loaded_runner_gets_the_call() -> None:
    state: PoolState[str] = PoolState(min=0, max=3, max_concurrency=3, single_use=False)
    for rid in ("a", "b"):
        state.boot_started()
        state.boot_succeeded(rid, 0.0)
    picks = [state.acquire(f"w{i}", 0.0)[0] for i in range(4)]
    assert picks == ["a", "b", "a", "b"]
    state.release("a", 1.0)
    assert state.acquire("w", 1.0)[0] == "a"


def test_booting_runners_count_against_max_and_absorb_waiters() -> None:
    state: PoolState[str] = PoolState(min=0, max=2, max_concurrency=2, single_use=False)
    rid, decision = state.acquire("w1", 0.0)
    assert rid is None and decision.boot == 1
    state.boot_started()
    assert state.acquire("w2", 0.0)[1].boot == 0  # the booting runner has room for w2 too
    assert state.acquire("w3", 0.0)[1].boot == 1
    state.boot_started()
    assert state.acquire("w4", 0.0)[1].boot == 0
    assert state.acquire("w5", 0.0)[1].boot == 0  # max reached: queue only
    grants = state.boot_succeeded("a", 0.0).grants
    assert grants == [("w1", "a"), ("w2", "a")]  # FIFO


def test_failed_boot_asks_for_a_retry_while_callers_wait() -> None:
    state: PoolState[str] = PoolState(min=0, max=1, max_concurrency=1, single_use=False)
    state.acquire("w1", 0.0)
    state.boot_started()
    decision = state.boot_failed(RuntimeError("no"))
    assert decision.boot == 1 and isinstance(state.last_boot_error, RuntimeError)
    state.forget_waiter("w1")
    state.boot_started()
    assert state.boot_failed(RuntimeError("no")).boot == 0  # nobody waits: no retry


def test_single_use_runner_is_retired_and_stopped_after_its_call() -> None:
    state: PoolState[str] = PoolState(min=0, max=1, max_concurrency=10, single_use=True)
    state.boot_started()
    state.boot_succeeded("a", 0.0)
    assert state.acquire("w1", 0.0)[0] == "a"
    rid, decision = state.acquire("w2", 0.0)
    assert rid is None and decision.boot == 0  # the spent runner still counts against max
    decision = state.release("a", 1.0)
    assert decision.stop == ["a"]
    assert state.remove("a").boot == 1  # now w2 gets a fresh runner


def test_idle_runners_above_min_stop_first() -> None:
    state: PoolState[str] = PoolState(min=1, max=3, max_concurrency=1, single_use=False)
    for rid in ("a", "b", "c"):
        state.boot_started()
        state.boot_succeeded(rid, 0.0)
    assert state.idle_runners(10.0, idle_after=5.0, min_idle_after=None) == ["a", "b"]
    for rid in ("a", "b"):
        state.remove(rid)
    assert state.idle_runners(100.0, idle_after=5.0, min_idle_after=None) == []
    assert state.idle_runners(100.0, idle_after=5.0, min_idle_after=50.0) == ["c"]


def test_a_cancelled_waiter_leaves_the_queue_and_the_rest_keep_their_order() -> None:
    state: PoolState[str] = PoolState(min=0, max=1, max_concurrency=1, single_use=False)
    state.boot_started()
    state.boot_succeeded("a", 0.0)
    assert state.acquire("busy", 0.0)[0] == "a"
    for waiter in ("w1", "w2", "w3"):
        assert state.acquire(waiter, 0.0)[0] is None
    state.forget_waiter("w2")
    state.forget_waiter("never-queued")  # already granted or never queued: nothing to do
    assert state.release("a", 1.0).grants == [("w1", "a")]
    assert state.release("a", 2.0).grants == [("w3", "a")]
    assert list(state.waiters) == []


def test_a_held_runner_is_not_idle_and_uses_no_slot() -> None:
    state: PoolState[str] = PoolState(min=0, max=2, max_concurrency=1, single_use=False)
    state.boot_started()
    state.boot_succeeded("a", 0.0)
    assert state.hold("a") and state.hold("a")
    assert not state.hold("unknown")
    assert state.idle_runners(100.0, idle_after=1.0, min_idle_after=None) == []
    assert state.acquire("w1", 0.0)[0] == "a"  # a hold is not a call: the slot is free
    assert state.release("a", 50.0).stop == []
    assert state.unhold("a", 60.0).stop == []
    assert state.idle_runners(100.0, idle_after=1.0, min_idle_after=None) == []  # one hold left
    assert state.unhold("a", 70.0).stop == []
    assert state.runners["a"].idle_since == 70.0  # idle from the last hold's end
    assert state.idle_runners(70.5, idle_after=1.0, min_idle_after=None) == []
    assert state.idle_runners(71.0, idle_after=1.0, min_idle_after=None) == ["a"]


def test_a_held_retired_runner_stops_when_its_last_hold_ends() -> None:
    state: PoolState[str] = PoolState(min=0, max=1, max_concurrency=10, single_use=True)
    state.boot_started()
    state.boot_succeeded("a", 0.0)
    assert state.acquire("w1", 0.0)[0] == "a"  # single use: retired on take
    assert state.hold("a")  # its result is a stream the parent still reads
    assert state.release("a", 1.0).stop == []
    assert state.unhold("a", 2.0).stop == ["a"]
    assert state.unhold("a", 3.0).stop == []  # no hold left to drop
    assert state.unhold("gone", 3.0).stop == []


def test_retire_waits_for_holds_as_for_calls() -> None:
    state: PoolState[str] = PoolState(min=0, max=2, max_concurrency=2, single_use=False)
    state.boot_started()
    state.boot_succeeded("a", 0.0)
    state.hold("a")
    decision = state.retire("a")
    assert decision.stop == [] and decision.boot == 0  # nobody waits: no replacement yet
    assert state.acquire("w1", 0.0) == (None, Decision(boot=1))  # retired: no new work
    assert state.unhold("a", 1.0).stop == ["a"]


def test_an_idle_runner_that_declines_to_stop_takes_work_again() -> None:
    state: PoolState[str] = PoolState(min=0, max=1, max_concurrency=1, single_use=False)
    state.boot_started()
    state.boot_succeeded("a", 0.0)
    assert state.idle_runners(10.0, idle_after=5.0, min_idle_after=None) == ["a"]
    assert state.acquire("w1", 10.0)[0] is None  # asked whether it may stop: no new work meanwhile
    assert state.keep("a", 11.0).grants == [("w1", "a")]
    state.release("a", 12.0)
    assert state.idle_runners(16.0, idle_after=5.0, min_idle_after=None) == []  # idle time restarted
    assert state.idle_runners(17.0, idle_after=5.0, min_idle_after=None) == ["a"]
    state.retire("a")  # recycled while being asked: declining no longer keeps it
    assert state.keep("a", 18.0).stop == ["a"]
    assert state.acquire("w2", 18.0)[0] is None


def test_heaps_stay_bounded_over_many_decisions() -> None:
    """Stale heap entries are dropped or compacted: the work per decision stays bounded."""
    state: PoolState[int] = PoolState(min=0, max=5000, max_concurrency=4, single_use=False)
    for i in range(5000):
        state.boot_started()
        state.boot_succeeded(f"r{i}", 0.0)
    rids = [state.acquire(i, 0.0)[0] for i in range(20_000)]
    assert rids[:3] == ["r0", "r1", "r2"] and rids[5000] == "r0"  # least loaded, then boot order
    for i in range(20_000, 120_000):
        assert state.acquire(i, 0.0)[0] is None
    for step in range(50_000):
        state.forget_waiter(20_000 + 2 * step)
        grants = state.release(f"r{step % 5000}", 1.0).grants
        assert grants == [(20_000 + 2 * step + 1, f"r{step % 5000}")]
    assert len(state._free) + len(state._idle) <= 4 * len(state.runners) + 64


# -- warm spares -----------------------------------------------------------------------
def _boot(state: PoolState[str], decision: Decision[str], names: list[str], now: float) -> list[tuple[str, str]]:
    """Start and finish the boots ``decision`` asks for, naming them ``names``; the grants."""
    grants = []
    for _ in range(decision.boot):
        state.boot_started()
    for rid in names[: decision.boot]:
        grants += state.boot_succeeded(rid, now).grants
    return grants


def test_a_call_boots_the_warm_spares_beside_its_own_runner() -> None:
    state: PoolState[str] = PoolState(min=0, max=5, max_concurrency=1, single_use=False, warm=2, warm_for=30.0)
    rid, decision = state.acquire("w1", 0.0)
    assert rid is None and (decision.boot, decision.warm) == (3, 2)  # one for w1, two spares
    assert _boot(state, decision, ["a", "b", "c"], 0.1) == [("w1", "a")]
    assert state.spare == 2 and state.warm_spares == 2
    rid, decision = state.acquire("w2", 0.2)
    assert rid == "b" and (decision.boot, decision.warm) == (1, 1)  # a spare went to work: one more
    _boot(state, decision, ["d"], 0.3)
    rid, decision = state.acquire("w3", 0.4)
    assert rid == "c" and (decision.boot, decision.warm) == (1, 1)  # the last one max allows
    _boot(state, decision, ["e"], 0.5)
    rid, decision = state.acquire("w4", 0.6)
    assert rid == "d" and decision.boot == 0  # max=5 reached: one spare left, no more


def test_warm_spares_stay_while_the_pool_is_busy_and_idle_away_once_it_is_quiet() -> None:
    state: PoolState[str] = PoolState(min=1, max=6, max_concurrency=1, single_use=False, warm=2, warm_for=10.0)
    _, decision = state.acquire("w1", 0.0)
    _boot(state, decision, ["a", "b", "c"], 0.0)
    state.release("a", 1.0)  # three idle runners; two spares are what warm=2 keeps (min's one among them)
    assert state.idle_runners(5.0, 2.0, None) == ["b"]  # the longest idle of the three goes
    assert state.spare == 2
    assert state.remove("b").boot == 0  # gone: nothing boots, no call asked
    assert state.idle_runners(9.0, 2.0, None) == []  # the last call was 9 s ago: still busy
    assert state.idle_runners(10.5, 2.0, None) == ["c"]  # quiet: down to min
    assert state.idle_runners(60.0, 2.0, None) == []  # min stays (min_idle_shutdown_after=None)


def test_min_runners_count_as_warm_spares() -> None:
    state: PoolState[str] = PoolState(min=2, max=4, max_concurrency=1, single_use=False, warm=1, warm_for=None)
    for rid in ("a", "b"):
        state.boot_started()
        state.boot_succeeded(rid, 0.0)
    rid, decision = state.acquire("w1", 1.0)
    assert rid == "a" and decision.boot == 0  # b is idle: the one spare warm=1 asks for
    rid, decision = state.acquire("w2", 1.0)
    assert rid == "b" and (decision.boot, decision.warm) == (1, 1)


def test_single_use_keeps_fresh_runners_ready_for_the_next_calls() -> None:
    state: PoolState[str] = PoolState(min=0, max=3, max_concurrency=5, single_use=True, warm=1, warm_for=30.0)
    _, decision = state.acquire("w1", 0.0)
    assert (decision.boot, decision.warm) == (2, 1)
    assert _boot(state, decision, ["a", "b"], 0.0) == [("w1", "a")]
    rid, decision = state.acquire("w2", 0.1)
    assert rid == "b" and (decision.boot, decision.warm) == (1, 1)  # b is spent by w2: c is the next
    assert state.release("a", 0.2).stop == ["a"]  # single use: a stops after its call


def test_a_quiet_pool_boots_no_spares() -> None:
    state: PoolState[str] = PoolState(min=0, max=3, max_concurrency=1, single_use=False, warm=2, warm_for=5.0)
    assert state.warm_spares == 0
    state.boot_started()
    assert state.boot_failed(RuntimeError("no")).boot == 0  # no caller: no retry, no spare


# -- the new structure against the simple one it replaced ----------------------------------
@dataclasses.dataclass
class RefSlots:
    id: str
    capacity: int
    active: int = 0
    retired: bool = False
    idle_since: float | None = None
    holds: int = 0
    asked: bool = False


class Reference:
    """The bookkeeping as it was (linear scans, a deque), plus holds and warm spares as specified."""

    def __init__(self, *, min: int, max: int, max_concurrency: int, single_use: bool, warm: int = 0,
                 warm_for: float | None = None) -> None:
        self.min, self.max, self.single_use = min, max, single_use
        self.warm, self.warm_for = warm, warm_for
        self.last_call: float | None = None
        self.capacity = 1 if single_use else max_concurrency
        self.runners: dict[str, RefSlots] = {}
        self.booting = 0
        self.waiters: deque[int] = deque()

    def acquire(self, waiter: int, now: float) -> tuple[str | None, Decision[int]]:
        self.last_call = now
        if not self.waiters:
            rid = self._take()
            if rid is not None:
                return rid, self._boots_needed(Decision(), now) if self.warm else Decision()
        self.waiters.append(waiter)
        return None, self._boots_needed(Decision(), now)

    def take_on(self, rid: str) -> bool:
        s = self.runners.get(rid)
        if s is None or s.retired or s.active >= s.capacity:
            return False
        s.active += 1
        s.idle_since = None
        return True

    def forget_waiter(self, waiter: int) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)

    def release(self, rid: str, now: float) -> Decision[int]:
        s = self.runners[rid]
        s.active -= 1
        if s.active == 0 and s.holds == 0:
            s.idle_since = now
        decision: Decision[int] = Decision(grants=self._serve())
        if self.warm and decision.grants:
            self._boots_needed(decision, now)
        if s.retired and s.active == 0 and s.holds == 0:
            decision.stop.append(rid)
        return decision

    def hold(self, rid: str) -> bool:
        s = self.runners.get(rid)
        if s is None:
            return False
        s.holds += 1
        s.idle_since = None
        return True

    def unhold(self, rid: str, now: float) -> Decision[int]:
        s = self.runners.get(rid)
        if s is None or s.holds == 0:
            return Decision()
        s.holds -= 1
        if s.active == 0 and s.holds == 0:
            s.idle_since = now
            if s.retired:
                return Decision(stop=[rid])
        return Decision()

    def boot_started(self) -> None:
        self.booting += 1

    def boot_succeeded(self, rid: str, now: float) -> Decision[int]:
        self.booting -= 1
        self.runners[rid] = RefSlots(rid, self.capacity, idle_since=now)
        decision: Decision[int] = Decision(grants=self._serve())
        return self._boots_needed(decision, now) if self.warm and decision.grants else decision

    def boot_failed(self) -> Decision[int]:
        self.booting -= 1
        return self._boots_needed(Decision(), None)

    def retire(self, rid: str) -> Decision[int]:
        s = self.runners.get(rid)
        if s is None or s.retired:
            if s is not None:
                s.asked = False
            return Decision()
        s.retired = True
        return self._boots_needed(Decision(stop=[rid] if s.active == 0 and s.holds == 0 else []), None)

    def keep(self, rid: str, now: float) -> Decision[int]:
        s = self.runners.get(rid)
        if s is None or not s.retired:
            return Decision()
        if not s.asked:
            return Decision(stop=[rid] if s.active == 0 and s.holds == 0 else [])
        s.asked = s.retired = False
        if s.active == 0 and s.holds == 0:
            s.idle_since = now
        return Decision(grants=self._serve())

    def fence(self, rid: str) -> None:
        if rid in self.runners:
            self.runners[rid].retired = True
            self.runners[rid].asked = False

    def remove(self, rid: str) -> Decision[int]:
        self.runners.pop(rid, None)
        return self._boots_needed(Decision(), None)

    def idle_runners(self, now: float, idle_after: float | None, min_idle_after: float | None) -> list[str]:
        live = [s for s in self.runners.values() if not s.retired]
        surplus = len(live) + self.booting - self.min
        idle = sorted((s for s in live if s.active == 0 and s.holds == 0 and s.idle_since is not None),
                      key=lambda s: s.idle_since or 0.0)
        reapable = len(idle) - (self.warm if self._busy(now) else 0)
        out = []
        for s in idle:
            if surplus > 0 and reapable <= 0:
                break  # the most recently idle are the warm spares
            threshold = idle_after if surplus > 0 else min_idle_after
            assert s.idle_since is not None
            if threshold is not None and now - s.idle_since >= threshold:
                out.append(s.id)
                s.retired = s.asked = True
                surplus -= 1
                reapable -= 1
        return out

    def _take(self) -> str | None:
        best: RefSlots | None = None
        for s in self.runners.values():
            if not s.retired and s.active < s.capacity and (best is None or s.active < best.active):
                best = s
        if best is None:
            return None
        best.active += 1
        best.idle_since = None
        if self.single_use:
            best.retired = True
        return best.id

    def _serve(self) -> list[tuple[int, str]]:
        grants = []
        while self.waiters:
            rid = self._take()
            if rid is None:
                break
            grants.append((self.waiters.popleft(), rid))
        return grants

    def spares(self) -> int:
        return sum(1 for s in self.runners.values() if not s.retired and s.active == 0 and s.holds == 0)

    def _busy(self, now: float) -> bool:
        return self.last_call is not None and (self.warm_for is None or now - self.last_call < self.warm_for)

    def _boots_needed(self, decision: Decision[int], now: float | None) -> Decision[int]:
        room = self.max - len(self.runners) - self.booting
        if room <= 0:
            return decision
        uncovered = len(self.waiters) - self.booting * self.capacity
        demand = min(room, -(-uncovered // self.capacity)) if uncovered > 0 else 0
        spares = 0
        if self.warm and now is not None and self._busy(now):
            for_waiters = -(-len(self.waiters) // self.capacity)
            coming = self.spares() + max(0, self.booting - for_waiters)
            spares = min(room - demand, max(0, self.warm - coming))
        decision.boot, decision.warm = demand + spares, spares
        return decision


# Weighted by repetition: enough boots, calls and releases to reach busy, queued states.
OPS = ("boot_started", "boot_started", "boot_succeeded", "boot_succeeded", "boot_failed", "acquire", "acquire",
       "acquire", "take_on", "forget_waiter", "release", "release", "release", "retire", "fence", "remove",
       "idle_runners", "idle_runners", "hold", "unhold", "keep")
THRESHOLDS = st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0, 3.0]))


def _snapshot(state: Any) -> tuple[Any, ...]:
    runners = [(s.id, s.active, s.retired, s.idle_since, s.holds, s.asked) for s in state.runners.values()]
    return runners, list(state.waiters), state.booting


def _apply(state: Any, op: str, pick: int, now: float, thresholds: tuple[float | None, float | None],
           waiter: int) -> object:
    """One operation, on either model; ``pick`` chooses among the runners or waiters."""
    rids = list(state.runners)
    rid = rids[pick % len(rids)] if rids else "none"
    if op == "boot_started":
        return state.boot_started()
    if op == "boot_succeeded":
        # Ids are never reused while their runner is known; a removed one may come back.
        fresh = f"r{pick % 12}"
        return state.boot_succeeded(fresh, now) if state.booting and fresh not in state.runners else None
    if op == "boot_failed":
        return (state.boot_failed(RuntimeError("no")) if isinstance(state, PoolState) else state.boot_failed()) \
            if state.booting else None
    if op == "acquire":
        return state.acquire(waiter, now)
    if op == "take_on":
        return state.take_on(rid)
    if op == "forget_waiter":
        waiting = list(state.waiters)
        return state.forget_waiter(waiting[pick % len(waiting)] if waiting else -1)
    if op == "release":
        busy = [r for r in rids if state.runners[r].active > 0]  # the pool releases only what it took
        return state.release(busy[pick % len(busy)], now) if busy else None
    if op in ("retire", "fence", "remove", "hold"):
        return getattr(state, op)(rid)
    if op in ("unhold", "keep"):
        return getattr(state, op)(rid, now)
    return state.idle_runners(now, *thresholds)


@settings(max_examples=300, deadline=None)
@given(
    config=st.tuples(st.integers(0, 3), st.integers(1, 6), st.integers(1, 3), st.booleans(), st.integers(0, 4),
                     THRESHOLDS),
    steps=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.sampled_from([0.0, 0.0, 0.25, 1.0, 2.5]),
                             st.tuples(THRESHOLDS, THRESHOLDS)), min_size=20, max_size=150),
)
def test_same_decisions_as_the_simple_model(config: tuple[int, int, int, bool, int, float | None],
                                            steps: list[tuple[str, int, float, tuple[Any, Any]]]) -> None:
    lo, hi, concurrency, single_use, warm, warm_for = config
    warm = min(warm, lo + hi)
    fast: PoolState[int] = PoolState(min=lo, max=lo + hi, max_concurrency=concurrency, single_use=single_use,
                                     warm=warm, warm_for=warm_for)
    ref = Reference(min=lo, max=lo + hi, max_concurrency=concurrency, single_use=single_use, warm=warm,
                    warm_for=warm_for)
    now = 0.0
    for waiter, (op, pick, dt, thresholds) in enumerate(steps):
        now += dt
        ours = _apply(fast, op, pick, now, thresholds, waiter)
        theirs = _apply(ref, op, pick, now, thresholds, waiter)
        assert ours == theirs, (op, pick)
        assert _snapshot(fast) == _snapshot(ref), (op, pick)
        assert fast.spare == ref.spares(), (op, pick)
