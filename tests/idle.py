"""Proof that idle reapers have looked, for tests that assert a runner was *not* stopped.

Sleeping "long enough" proves nothing on a loaded machine. Instead a witness pool stops
idle runners of its own, whose idleness began after the runners under test became idle:
every pool's reaper sleeps its tick in the same event loop, and timers fire in deadline
order, so a reaper ticking faster than the witness's has looked at its runners (past the
threshold) between the witness's two idle stops.
"""

from __future__ import annotations

from flame_asgi import FlamePool, LocalBackend
from tests import remote
from tests.conftest import until


async def reapers_looked_past(idle: float) -> None:
    """Return once every pool whose reaper ticks at ``idle / 5`` or faster has looked at its
    runners after they had all been idle (from the moment of this call) for ``idle`` seconds."""
    stops: list[str] = []
    # A longer threshold, so a slower tick (idle_shutdown_after / 5): strictly later deadlines.
    async with FlamePool("witness", backend=LocalBackend(), idle_shutdown_after=idle * 1.25,
                         on_shrink=lambda meta: stops.append(meta["reason"])) as witness:
        await witness.call(remote.works)
        await until(lambda: len(stops) == 1, what="the witness runner to idle down")
        await witness.call(remote.works)
        await until(lambda: len(stops) == 2, what="the second witness runner to idle down")
    assert stops == ["idle", "idle"]
