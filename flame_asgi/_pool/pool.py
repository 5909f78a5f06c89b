"""FlamePool: elastic runners between ``min`` and ``max``, and the work placed on them.

The pool is a facade over four parts, each with one job: ``PoolConfig`` (the options,
checked and frozen), ``Runners`` (boots, stops, reaping, hooks; the only user of
``PoolState``), ``Slots`` (a caller's wait for room) and ``Dispatch`` (how work runs:
pickling, retries, timeouts). A lease (``FlameRunner``) gets the slots and the dispatch,
never the pool.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any, TypeVar, overload

from flame_asgi._base.exceptions import BootError
from flame_asgi._observe import telemetry
from flame_asgi._pool.child import ChildHandle
from flame_asgi._pool.config import Hook, PoolConfig
from flame_asgi._pool.dispatch import Dispatch
from flame_asgi._pool.lease import FlameRunner
from flame_asgi._pool.map import MapIterator
from flame_asgi._pool.runners import PoolStats, Runners
from flame_asgi._pool.slots import Slots
from flame_asgi._pool.stream import RemoteStream
from flame_asgi.backends import Backend

T = TypeVar("T")


class FlamePool:
    """A pool of runners: copies of this app, booted on demand through a backend.

    Use it as ``async with FlamePool("name", ...) as pool`` or register it on an app with
    ``app.add_flame_pool("name", ...)``. Times are seconds; ``None`` means never.

    - ``backend``: where runners boot; ``None`` picks ``FLAME_BACKEND`` (default local).
    - ``min`` / ``max``: runners kept warm / never exceeded (booting ones count).
    - ``warm``: spare runners kept booted beyond the busy ones while the pool has had a call
      within ``idle_shutdown_after``, within ``max``, so a burst finds runners up; once the
      pool is quiet they idle away like any runner (down to ``min``). With ``single_use``,
      the fresh runners each next call takes.
    - ``max_concurrency``: calls, streams and children one runner takes at once.
    - ``idle_shutdown_after``: a runner with no work this long stops; the ``min``
      runners use ``min_idle_shutdown_after`` (default: never). ``(seconds, predicate)``:
      it stops only if ``predicate()``, run on the runner, also returns true then.
    - ``boot_timeout``: how long a boot may take, and a queued caller's default wait.
    - ``timeout``: default run time of a call. ``shutdown_timeout``: how long closing
      waits for ``link=False`` work.
    - ``single_use``: each runner serves one call, then stops.
    - ``on_grow_start(meta)``, ``on_grow_end(error_or_None, meta)``, ``on_shrink(meta)``:
      hooks (sync or async) with ``meta`` = ``{"name", "count", "runner_id"[, "reason"]}``.
    - ``retries``: default of ``call(..., retries=)`` and ``cast``: how often a call whose
      runner was lost is re-run on another runner (0: never; only for idempotent work).
    """

    def __init__(
        self,
        name: str,
        *,
        backend: Backend | None = None,
        min: int = 0,
        max: int = 1,
        max_concurrency: int = 100,
        warm: int = 0,
        idle_shutdown_after: float | tuple[float, Callable[[], Any]] | None = 30.0,
        min_idle_shutdown_after: float | None = None,
        boot_timeout: float | None = 30.0,
        timeout: float | None = 30.0,
        shutdown_timeout: float | None = 30.0,
        single_use: bool = False,
        on_grow_start: Hook | None = None,
        on_grow_end: Hook | None = None,
        on_shrink: Hook | None = None,
        retries: int = 0,
    ) -> None:
        self.config = config = PoolConfig.build(
            name, backend=backend, min=min, max=max, max_concurrency=max_concurrency, warm=warm,
            idle_shutdown_after=idle_shutdown_after, min_idle_shutdown_after=min_idle_shutdown_after,
            boot_timeout=boot_timeout, timeout=timeout, shutdown_timeout=shutdown_timeout, single_use=single_use,
            on_grow_start=on_grow_start, on_grow_end=on_grow_end, on_shrink=on_shrink, retries=retries)
        self._runners = Runners(config)
        self._slots = Slots(config, self._runners, self.start)
        self._dispatch = Dispatch(config, self._runners, self._slots)

    # -- what it was built with (read-only: build another pool to change one) -----------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def backend(self) -> Backend:
        return self.config.backend

    @property
    def min(self) -> int:
        return self.config.min

    @property
    def max(self) -> int:
        return self.config.max

    @property
    def warm(self) -> int:
        return self.config.warm

    @property
    def max_concurrency(self) -> int:
        return self.config.max_concurrency

    @property
    def boot_timeout(self) -> float | None:
        return self.config.boot_timeout

    @property
    def timeout(self) -> float | None:
        return self.config.timeout

    @property
    def shutdown_timeout(self) -> float | None:
        return self.config.shutdown_timeout

    @property
    def idle_shutdown_after(self) -> float | tuple[float, Callable[[], Any]] | None:
        return self.config.idle_shutdown_after

    @property
    def min_idle_shutdown_after(self) -> float | None:
        return self.config.min_idle_shutdown_after

    @property
    def single_use(self) -> bool:
        return self.config.single_use

    @property
    def retries(self) -> int:
        return self.config.retries

    @property
    def app(self) -> Any | None:
        """The app whose lifespan starts and stops this pool (set by ``add_flame_pool``)."""
        return self._slots.app

    @app.setter
    def app(self, app: Any | None) -> None:
        self._slots.app = app

    @property
    def running(self) -> bool:
        """Started and not closing: it takes work."""
        return self._runners.running

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Boot the ``min`` runners (in parallel); fail if any of them cannot boot."""
        if self._runners.running:
            return
        telemetry.pool_started(self)
        failures = await self._runners.open(self.app)
        if failures:
            await self.aclose()
            first = failures[0]
            raise BootError(f"pool {self.name!r} could not boot its {self.min} min runner(s): {first}",
                            reason=getattr(first, "reason", str(first))) from first

    async def __aenter__(self) -> FlamePool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop taking work, let ``link=False`` work finish (``shutdown_timeout``), stop runners."""
        if self._runners.closed:
            return
        self._runners.closing()
        telemetry.pool_stopped(self)
        self._dispatch.cancel_linked_casts()
        await self._dispatch.drain_unlinked(self.shutdown_timeout)
        await self._runners.close()

    def refuse(self, reason: str) -> None:
        """Never start: every call raises PoolClosed with ``reason`` (an app on trio, say)."""
        self._slots.refuse(reason)

    def stats(self) -> PoolStats:
        return self._runners.stats()

    def __repr__(self) -> str:
        s = self.stats() if self.running else None
        live = f" runners={len(s.runners)} booting={s.booting} waiting={s.waiting}" if s else ""
        state = "running" if self.running else ("closed" if self._runners.closed else "new")
        return f"<FlamePool {self.name!r} {state} min={self.min} max={self.max} pid={os.getpid()}{live}>"

    def runner(self, *, timeout: float | None = None) -> FlameRunner:
        """Lease one runner slot: ``async with pool.runner() as runner:``; every call made
        through ``runner`` runs on that one runner. ``timeout`` bounds the wait for the slot
        (default ``boot_timeout``)."""
        return FlameRunner(self.config, self._slots, self._dispatch, self.boot_timeout if timeout is None else timeout)

    # -- the public calls ---------------------------------------------------------------
    # Two overloads, async first: with one union parameter mypy cannot tell whether T is
    # the coroutine or its result, and rejects every async function. The option names are
    # reserved; every other keyword argument goes to ``fn`` (as with ``asyncio.to_thread``).
    @overload
    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None,
                   link: bool = True, on_progress: Callable[[Any], Any] | None = None,
                   track_resources: bool = False, retries: int | None = None, **kwargs: Any) -> T: ...

    @overload
    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None,
                   link: bool = True, on_progress: Callable[[Any], Any] | None = None,
                   track_resources: bool = False, retries: int | None = None, **kwargs: Any) -> T: ...

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, link: bool = True,
                   on_progress: Callable[[Any], Any] | None = None, track_resources: bool = False,
                   retries: int | None = None, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on a runner and return its result.

        ``timeout`` bounds the wait for a slot (default ``boot_timeout``) and the run
        (default the pool's ``timeout``); a run past it is cancelled on the runner, whatever
        ``link``. ``link=False``: the work runs on if the caller goes away. ``retries``
        (default the pool's): re-run on another runner if the runner is lost (idempotent
        work only). ``track_resources``: ``RemoteBytes`` and trackable objects in the
        result keep their runner up until read or released.
        """
        opts = self.config.call_options(timeout, link, on_progress, track_resources, retries)
        with telemetry.observe_call(self.name, "call", fn) as obs:
            return await self._dispatch.call(obs, fn, args, kwargs, opts, self._slots)

    def cast(self, fn: Callable[..., Any], *args: Any, link: bool = True, timeout: float | None = None,
             retries: int | None = None, **kwargs: Any) -> None:
        """Schedule ``fn(*args, **kwargs)`` on a runner and return at once.

        As in FLAME, a cast runs to completion unless ``timeout`` is given; a failed cast
        is logged (``flame_asgi.pool``) with the function's name and the reason.
        """
        # No run limit unless the cast has a timeout (the wait for a slot has boot_timeout).
        opts = self.config.call_options(timeout, link, retries=retries, kind="cast", run_default=False)
        self._dispatch.cast(self._slots, fn, args, kwargs, opts)

    def stream(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
               link: bool = True, on_progress: Callable[[Any], Any] | None = None, **kwargs: Any) -> RemoteStream:
        """Iterate (``async for``) over what generator ``fn(*args, **kwargs)`` yields on a
        runner; ``report(event)`` calls in it reach ``on_progress``, in order with the items."""
        return self._dispatch.stream(self._slots, fn, args, kwargs, timeout, link, on_progress)

    async def place_child(self, fn: Callable[..., Any], *args: Any, link: bool = True,
                          on_progress: Callable[[Any], Any] | None = None, **kwargs: Any) -> ChildHandle:
        """Start long-running ``fn(*args, **kwargs)`` on a runner; it holds a slot until it
        ends. ``await handle.send(message)`` reaches ``flame_asgi.receive()`` in the child."""
        return await self._dispatch.place_child(self._slots, fn, args, kwargs, link, on_progress)

    def map(self, fn: Callable[..., Any], iterable: Iterable[Any] | AsyncIterable[Any], *,
            timeout: float | None = None, ordered: bool = True, max_in_flight: int | None = None,
            return_exceptions: bool = False, retries: int | None = None) -> MapIterator:
        """``async for result in pool.map(fn, items)``: ``fn(item)`` for each item, spread over
        the pool, at most ``max_in_flight`` at once (default: every slot the pool can have).

        Results come in input order (``ordered=True``) or as they finish. The first error
        cancels the calls still running and is raised, unless ``return_exceptions=True``
        (the exception is then yielded in the item's place). Leaving the loop early cancels
        what is still running.
        """
        run = functools.partial(self.call, timeout=timeout, retries=retries)
        limit = self.max * self.max_concurrency if max_in_flight is None else max_in_flight
        return MapIterator(run, fn, iterable, ordered=ordered, max_in_flight=limit,
                           return_exceptions=return_exceptions)
