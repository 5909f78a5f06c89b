"""Slots: a caller's wait for room on a runner, and the room given back.

Every kind of work (call, cast, stream, child) asks a ``Placement`` for a slot and gives
it back when the work ends. ``Slots`` is the pool's placement: any free slot of the pool,
the caller queued FIFO within its deadline while runners boot. A lease (``FlameRunner``)
is the other placement: the slot it leased, or another slot of the same runner.

A pool registered on an app whose lifespan never ran (a mounted sub-app) starts here,
on first use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from flame_asgi._base.exceptions import BootError, CallTimeout, PoolClosed
from flame_asgi._pool.config import PoolConfig
from flame_asgi._pool.runners import Runners, Waiter
from flame_asgi._wire.transfer import forget

log = logging.getLogger("flame_asgi.pool")


class Slots:
    """The pool's slots, for any caller; ``start`` starts the pool on first use."""

    def __init__(self, config: PoolConfig, runners: Runners, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._config = config
        self._runners = runners
        self._start = start
        self.app: Any | None = None  # set by add_flame_pool: the app whose lifespan runs the pool
        self._refused: str | None = None
        self._starting: asyncio.Task[None] | None = None  # a start on first use, under way

    def refuse(self, reason: str) -> None:
        """Never start: every call raises PoolClosed with ``reason`` (an app on trio, say)."""
        self._refused = reason

    def ensure_running(self) -> None:
        name = self._config.name
        if self._refused is not None:
            raise PoolClosed(f"pool {name!r} cannot run: {self._refused}")
        if not self._runners.running and not self._startable_on_use():
            state = "closed" if self._runners.closed else "not started"
            raise PoolClosed(f"pool {name!r} is {state}: use `async with pool`, or register it "
                             "with add_flame_pool(app, ...) and run the app's lifespan")

    def _startable_on_use(self) -> bool:
        # A pool registered on an app whose lifespan never ran it: a mounted sub-app (Starlette
        # does not run their lifespans) or an app whose lifespan_context was replaced later.
        # Closed pools stay closed: their app has shut down.
        r = self._runners
        return self.app is not None and not r.closed and not r.running and self._refused is None

    async def _start_on_use(self) -> None:
        if self._starting is None:
            log.warning(
                "pool %r started on first use: the lifespan of its app did not start it (a mounted sub-app's "
                "lifespan does not run, or app.router.lifespan_context was replaced after add_flame_pool). "
                "Its runners stop when this process exits; to start and stop it with your server, register "
                "the pool on the top-level app, or run `async with pool:` in your own lifespan.", self._config.name)
            self._starting = asyncio.get_running_loop().create_task(self._start())
        try:
            await asyncio.shield(self._starting)
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    async def checkout(self, tokens: list[str], wait: float | None) -> str:
        """A slot within ``wait`` seconds; if none comes, the work's Uploads will never be
        pulled: they are forgotten."""
        try:
            return await self._checkout(wait)
        except BaseException:
            forget(tokens)
            raise

    async def _checkout(self, wait: float | None) -> str:
        if self._startable_on_use():
            await self._start_on_use()
        self.ensure_running()
        runners, name = self._runners, self._config.name
        loop = runners.loop
        if asyncio.get_running_loop() is not loop:
            # Its runners' channels live on the loop it started in: nothing on this one
            # would ever read their replies.
            gone = ", which has closed" if loop.is_closed() else ""
            raise PoolClosed(
                f"pool {name!r} was started in another event loop{gone}; a pool serves the loop it started "
                "in. With Starlette's TestClient, use `with TestClient(app) as client:` so the app's lifespan "
                "starts its pools in the loop that serves the requests.")
        fut: Waiter = loop.create_future()
        rid = runners.acquire(fut)
        if rid is not None:
            return rid
        try:
            await asyncio.wait({fut}, timeout=wait)
        except asyncio.CancelledError:
            runners.forget_waiter(fut)
            if fut.done() and fut.exception() is None and fut.result() is not None:
                self.release(fut.result())  # type: ignore[arg-type]
            fut.cancel()
            raise
        if fut.done():
            granted = fut.result()
            if granted is None:
                raise PoolClosed(f"pool {name!r} closed while the call was waiting for a runner")
            return granted
        runners.forget_waiter(fut)
        fut.cancel()
        error = runners.last_boot_error
        if error is not None:
            raise BootError(f"pool {name!r}: no runner within {wait:g} s because booting failed: "
                            f"{error}", reason=getattr(error, "reason", str(error))) from error
        s = runners.stats()
        c = self._config
        raise CallTimeout(
            f"pool {name!r}: no free runner slot within {wait:g} s ({len(s.runners)} runners "
            f"busy, {s.booting} booting, max={c.max}, max_concurrency={c.max_concurrency}); "
            "raise the timeout, max or max_concurrency")

    def release(self, rid: str) -> None:
        self._runners.release(rid)

    def take_on(self, rid: str) -> bool:
        """One more slot on runner ``rid``, if it has room (a lease's concurrent call)."""
        return self._runners.take_on(rid)

    def has(self, rid: str) -> bool:
        """Is runner ``rid`` still in the pool?"""
        return rid in self._runners
