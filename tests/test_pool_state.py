"""PoolState alone: the scaling decisions, without any I/O."""

from __future__ import annotations

from flame_asgi._pool_state import PoolState


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
