"""Periodic deadlines on a shared power-of-two grid (``_base.ticks``): never later than
asked, at most one step earlier, and timers of one loop that start at different moments
land on the same few instants."""

from __future__ import annotations

import math
import random

import pytest

from flame_asgi._base.ticks import grid_step, on_grid


@pytest.mark.parametrize("period", [0.02, 0.1, 0.2, 1.0, 2.5, 10.0, 37.0])
def test_the_step_is_a_power_of_two_within_a_quarter_of_the_period(period: float) -> None:
    step = grid_step(period)
    assert math.log2(step).is_integer()
    assert period / 8 < step <= period / 4


@pytest.mark.parametrize("period", [0.0, -1.0, math.inf, math.nan])
def test_a_period_that_is_not_a_positive_number_is_refused(period: float) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        grid_step(period)


def test_a_deadline_moves_earlier_by_less_than_a_step_and_never_later() -> None:
    rng = random.Random(7)
    for _ in range(10_000):
        period = rng.uniform(0.01, 30.0)
        deadline = rng.uniform(0.0, 1e6)
        step = grid_step(period)
        assert deadline - step < on_grid(deadline, period) <= deadline


def test_timers_started_at_random_moments_share_a_few_instants() -> None:
    # 500 heartbeats of 2.5 s started anywhere within a minute: their next deadlines fall
    # on at most one instant per step of each interval, not on 500.
    rng = random.Random(11)
    interval = 2.5
    starts = [rng.uniform(1000.0, 1060.0) for _ in range(500)]
    deadlines = {on_grid(now + interval, interval) % interval for now in starts}
    assert len(deadlines) <= interval / grid_step(interval)


def test_a_coarser_grid_lands_on_points_of_a_finer_one() -> None:
    # The pool's idle sweep (every 1 s) wakes at instants the heartbeats (2.5 s) wake at too.
    heartbeat = grid_step(2.5)
    rng = random.Random(3)
    for _ in range(1000):
        sweep = on_grid(rng.uniform(0.0, 1e5), 1.0, parts=1)
        assert (sweep / heartbeat).is_integer()
