"""Slots: a caller's wait for room on a runner, the start of its work there, and the end.

``FlamePool`` inherits this part: ``_checkout`` asks ``PoolState`` for a slot (queueing
the caller, FIFO, within its deadline, and booting if needed), ``_start`` sends the work
to the runner, and the work's end gives the slot back. A pool registered on an app whose
lifespan never ran (a mounted sub-app) starts here, on first use.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from flame_asgi import _telemetry
from flame_asgi._exceptions import BootError, CallTimeout, PoolClosed, RunnerLost
from flame_asgi._protocol import WorkKind
from flame_asgi._transfer import forget

if TYPE_CHECKING:
    from flame_asgi._connection import RemoteCall
    from flame_asgi._lease import Placement
    from flame_asgi._pool import PoolStats
    from flame_asgi._pool_scaling import _Runner
    from flame_asgi._pool_state import Decision, PoolState

log = logging.getLogger("flame_asgi.pool")
WINDOW = 32  # progress events / stream items in flight per call (back-pressure)


class PoolSlots:
    """Placing work on slots, for ``FlamePool`` (which sets every attribute declared here)."""

    name: str
    app: Any | None
    max: int
    max_concurrency: int
    loop: asyncio.AbstractEventLoop
    _state: PoolState[asyncio.Future[str | None]]
    _runners: dict[str, _Runner]
    _running: bool
    _closed: bool
    _refused: str | None
    _starting: asyncio.Task[None] | None
    _unlinked: int

    if TYPE_CHECKING:  # defined by FlamePool and PoolScaling; declared only for the type checker
        async def start(self) -> None: ...

        def stats(self) -> PoolStats: ...

        def _apply(self, decision: Decision[asyncio.Future[str | None]]) -> None: ...

    # -- slots --------------------------------------------------------------------------
    def refuse(self, reason: str) -> None:
        """Never start: every call raises PoolClosed with ``reason`` (an app on trio, say)."""
        self._refused = reason

    def _ensure_running(self) -> None:
        if self._refused is not None:
            raise PoolClosed(f"pool {self.name!r} cannot run: {self._refused}")
        if not self._running and not self._startable_on_use():
            state = "closed" if self._closed else "not started"
            raise PoolClosed(f"pool {self.name!r} is {state}: use `async with pool`, or register it "
                             "with add_flame_pool(app, ...) and run the app's lifespan")

    def _startable_on_use(self) -> bool:
        # A pool registered on an app whose lifespan never ran it: a mounted sub-app (Starlette
        # does not run their lifespans) or an app whose lifespan_context was replaced later.
        # Closed pools stay closed: their app has shut down.
        return self.app is not None and not self._closed and not self._running and self._refused is None

    async def _start_on_use(self) -> None:
        if self._starting is None:
            log.warning(
                "pool %r started on first use: the lifespan of its app did not start it (a mounted sub-app's "
                "lifespan does not run, or app.router.lifespan_context was replaced after add_flame_pool). "
                "Its runners stop when this process exits; to start and stop it with your server, register "
                "the pool on the top-level app, or run `async with pool:` in your own lifespan.", self.name)
            self._starting = asyncio.get_running_loop().create_task(self.start())
        try:
            await asyncio.shield(self._starting)
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    async def _checkout(self, wait: float | None) -> str:
        if self._startable_on_use():
            await self._start_on_use()
        self._ensure_running()
        if asyncio.get_running_loop() is not self.loop:
            # Its runners' channels live on the loop it started in: nothing on this one
            # would ever read their replies.
            gone = ", which has closed" if self.loop.is_closed() else ""
            raise PoolClosed(
                f"pool {self.name!r} was started in another event loop{gone}; a pool serves the loop it started "
                "in. With Starlette's TestClient, use `with TestClient(app) as client:` so the app's lifespan "
                "starts its pools in the loop that serves the requests.")
        fut: asyncio.Future[str | None] = self.loop.create_future()
        rid, decision = self._state.acquire(fut, self.loop.time())
        self._apply(decision)
        if rid is not None:
            return rid
        try:
            await asyncio.wait({fut}, timeout=wait)
        except asyncio.CancelledError:
            self._state.forget_waiter(fut)
            if fut.done() and fut.exception() is None and fut.result() is not None:
                self._release(fut.result())  # type: ignore[arg-type]
            fut.cancel()
            raise
        if fut.done():
            granted = fut.result()
            if granted is None:
                raise PoolClosed(f"pool {self.name!r} closed while the call was waiting for a runner")
            return granted
        self._state.forget_waiter(fut)
        fut.cancel()
        error = self._state.last_boot_error
        if error is not None:
            raise BootError(f"pool {self.name!r}: no runner within {wait:g} s because booting failed: "
                            f"{error}", reason=getattr(error, "reason", str(error))) from error
        s = self.stats()
        raise CallTimeout(
            f"pool {self.name!r}: no free runner slot within {wait:g} s ({len(s.runners)} runners "
            f"busy, {s.booting} booting, max={self.max}, max_concurrency={self.max_concurrency}); "
            "raise the timeout, max or max_concurrency")

    async def _checkout_for(self, tokens: list[str], wait: float | None) -> str:
        """``_checkout``; if no slot comes, the call's Uploads will never be pulled: forget them."""
        try:
            return await self._checkout(wait)
        except BaseException:
            forget(tokens)
            raise

    async def _start(self, rid: str, kind: WorkKind, payload: bytes, *, link: bool, progress: bool,
                     obs: _telemetry.CallObserver, tokens: list[str], placement: Placement,
                     track: bool = False) -> RemoteCall:
        """Send the work to its runner; the RemoteCall then owns the slot and the Upload tokens."""
        obs.acquired(rid)
        runner = self._runners.get(rid)
        if runner is None:
            placement.release(rid)
            forget(tokens)
            raise RunnerLost(f"runner {rid} went away before the call started", runner_id=rid)
        if not link:
            self._unlinked += 1  # every path out of conn.start calls on_finish exactly once
        return await runner.conn.start(kind, payload, link=link, progress=progress, window=WINDOW,
                                       on_finish=functools.partial(self._finished, rid, link, placement),
                                       trace=obs.trace, tokens=tokens, track=track)

    def _finished(self, rid: str, link: bool, placement: Placement) -> None:
        if not link:
            self._unlinked -= 1
        placement.release(rid)

    def _release(self, rid: str) -> None:
        self._apply(self._state.release(rid, self.loop.time()))
