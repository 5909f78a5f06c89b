"""Deadlines on a shared grid, so that many periodic timers of one event loop wake it once.

Each time an idle process's event loop wakes (``epoll_wait`` returns, the loop runs its
timers, goes back to sleep), it pays a fixed price in the kernel and in the interpreter
that is far larger than the little work most periodic timers do: on a sandboxed VM about
a millisecond of CPU. A parent with 150 runners keeps 150 heartbeat timers; started at
different moments, each of them wakes the loop on its own, 60 times a second.

So periodic deadlines are rounded *down* onto a grid whose step is a power of two: the
timers of every channel then fall on the same few instants and the loop wakes once for
all of them, and grids of different periods nest (every point of a coarser grid is a
point of a finer one), so the pool's idle sweep lands on heartbeat instants too. Rounding
down never makes a period longer than asked (what a peer's timeout counts on), and at
most one step shorter.
"""

from __future__ import annotations

import math


def grid_step(period: float, *, parts: int = 4) -> float:
    """The largest power of two (in seconds, possibly below 1) at most ``period / parts``."""
    if not period > 0 or not math.isfinite(period):
        raise ValueError(f"a period must be a positive number of seconds, not {period!r}")
    return 2.0 ** math.floor(math.log2(period / parts))


def on_grid(deadline: float, period: float, *, parts: int = 4) -> float:
    """``deadline`` rounded down to the grid of ``period``: between one step early and on time.

    A timer that must not fire early by much keeps ``parts=4`` (a heartbeat: at most a
    quarter of its interval early); one whose period is loose may take ``parts=1`` (the
    idle sweep), the coarsest grid, whose every point is on each finer one."""
    step = grid_step(period, parts=parts)
    return math.floor(deadline / step) * step
