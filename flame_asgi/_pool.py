"""FlamePool: elastic runners between ``min`` and ``max``, and the calls placed on them.

Scaling decisions come from ``PoolState`` (plain synchronous code); this module does the
I/O they ask for: boots in the background, wakes queued callers, stops idle runners,
and runs each call over its runner's signed channel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from flame_asgi import _telemetry
from flame_asgi._child import ChildHandle
from flame_asgi._exceptions import BootError
from flame_asgi._lease import CallOptions, FlameRunner, Placement
from flame_asgi._map import MapIterator
from flame_asgi._options import check_options
from flame_asgi._parent import runner_mode
from flame_asgi._pool_calls import PoolCalls
from flame_asgi._pool_scaling import BOOT_RETRY_INTERVAL, PoolScaling, _Runner
from flame_asgi._pool_slots import PoolSlots
from flame_asgi._pool_state import PoolState
from flame_asgi._secret import channel_secret
from flame_asgi._settings import MAX_PAYLOAD
from flame_asgi._stream import RemoteStream
from flame_asgi.backends import Backend, backend_from_env

if TYPE_CHECKING:
    pass

log = logging.getLogger("flame_asgi.pool")
T = TypeVar("T")
Hook = Callable[..., Any]
WINDOW = 32  # progress events / stream items in flight per call (back-pressure)


@dataclasses.dataclass(frozen=True)
class RunnerInfo:
    """A booted runner: ``url`` is its base URL (``None`` for the local backend); ``active``
    counts its calls, open streams and placed children."""

    id: str
    url: str | None
    active: int
    stopping: bool = False  # leaving the pool (idle, spent, recycled, shutting down): takes no new work


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A pool's state in *this* process: ``pid`` tells server workers' pools apart."""

    runners: list[RunnerInfo]
    booting: int
    waiting: int
    pid: int = dataclasses.field(default_factory=os.getpid)


class FlamePool(PoolCalls, PoolSlots, PoolScaling):
    """A pool of runners: copies of this app, booted on demand through a backend.

    Use it as ``async with FlamePool("name", ...) as pool`` or register it on an app with
    ``app.add_flame_pool("name", ...)``. Times are seconds; ``None`` means never.

    - ``backend``: where runners boot; ``None`` picks ``FLAME_BACKEND`` (default local).
    - ``min`` / ``max``: runners kept warm / never exceeded (booting ones count).
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
        check_options(name, dict(
            backend=backend, min=min, max=max, max_concurrency=max_concurrency,
            idle_shutdown_after=idle_shutdown_after, min_idle_shutdown_after=min_idle_shutdown_after,
            boot_timeout=boot_timeout, timeout=timeout, shutdown_timeout=shutdown_timeout, single_use=single_use,
            on_grow_start=on_grow_start, on_grow_end=on_grow_end, on_shrink=on_shrink, retries=retries))
        self.name = name
        self.backend = backend if backend is not None else backend_from_env()
        self.min = min
        self.max = max
        self.max_concurrency = max_concurrency
        self.idle_shutdown_after = idle_shutdown_after
        # FLAME's {time, fn}: idle that long *and* the predicate, run on the runner, agrees.
        self._idle_after, self._idle_predicate = (
            idle_shutdown_after if isinstance(idle_shutdown_after, tuple) else (idle_shutdown_after, None))
        self.min_idle_shutdown_after = min_idle_shutdown_after
        self.boot_timeout = boot_timeout
        self.timeout = timeout
        self.shutdown_timeout = shutdown_timeout
        self.single_use = single_use
        self.on_grow_start = on_grow_start
        self.on_grow_end = on_grow_end
        self.on_shrink = on_shrink
        self.retries = retries
        self.app: Any | None = None
        self._state: PoolState[asyncio.Future[str | None]] = PoolState(
            min=min, max=max, max_concurrency=max_concurrency, single_use=single_use)
        self._runners: dict[str, _Runner] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._boots: set[asyncio.Task[Any]] = set()
        self._casts: dict[asyncio.Task[None], bool] = {}  # task -> link
        self._unlinked = 0  # link=False calls still running remotely (closing waits for them)
        self._stopping: set[str] = set()
        self._ids = itertools.count(1)
        self._last_attempt = -BOOT_RETRY_INTERVAL
        self._boot_failures = 0
        self._running = False
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None
        self._backend_started = False
        self._refused: str | None = None
        self._starting: asyncio.Task[None] | None = None  # a start on first use, under way
        self._placement = Placement(self._checkout_for, self._release)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Boot the ``min`` runners (in parallel); fail if any of them cannot boot."""
        if self._running:
            return
        if self._closed:  # started again (a second app lifespan): begin from a clean slate
            self._closed = False
            self._state = PoolState(min=self.min, max=self.max, max_concurrency=self.max_concurrency,
                                    single_use=self.single_use)
        self.loop = asyncio.get_running_loop()
        self.backend.bind(self.name, self.app)
        self._backend_started = False
        if not runner_mode():
            # A runner's own pools start nothing (no fork server, no client) until they
            # boot something: most runners never call a pool.
            await self._start_backend()
        self._app_import = self.backend.app_import()
        self._version: str | None = None  # hashed when the first runner boots, off the event loop
        self._secret = channel_secret()
        self._max_payload = MAX_PAYLOAD.read()
        if runner_mode():
            self._state.min = 0  # a runner's own pools start empty: no chains of warm runners
        self._running = True
        _telemetry.pool_started(self)
        self._reaper = self.loop.create_task(self._reap_idle())
        count = self._state.min
        counts = []
        for _ in range(count):
            self._state.boot_started()
            counts.append(self._state.booting)
        results = await asyncio.gather(*(self._boot_runner(n) for n in counts))
        failures = [r for r in results if r is not None]
        if failures:
            await self.aclose()
            first = failures[0]
            raise BootError(f"pool {self.name!r} could not boot its {count} min runner(s): {first}",
                            reason=getattr(first, "reason", str(first))) from first

    async def __aenter__(self) -> FlamePool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop taking work, let ``link=False`` work finish (``shutdown_timeout``), stop runners."""
        if self._closed:
            return
        self._closed = True
        self._running = False
        _telemetry.pool_stopped(self)
        if self._reaper is not None:
            self._reaper.cancel()
        for fut in list(self._state.waiters):
            if not fut.done():
                fut.set_result(None)  # woken with no runner: the caller raises PoolClosed
        self._state.waiters.clear()
        for task, link in list(self._casts.items()):
            if link:
                task.cancel()
        await self._drain_unlinked()
        for task in list(self._boots):
            task.cancel()
        # Stops already under way (idle, single use) finish; then every other runner stops.
        # A stop takes the backend's stop_timeout, plus a few seconds to close the channel
        # and reap the process: one that hangs past that keeps going without holding us.
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=self.backend.stop_timeout + 5.0)
            if late:
                log.warning("pool %r: closing without waiting for %d stop(s) still under way", self.name,
                            len(late))
        await asyncio.gather(*(self._stop_runner(rid, "shutdown") for rid in list(self._runners)),
                             return_exceptions=True)
        if self._backend_started:
            await self.backend.aclose()

    async def _start_backend(self) -> None:
        if not self._backend_started:
            self._backend_started = True
            await self.backend.start()

    async def _drain_unlinked(self) -> None:
        deadline = None if self.shutdown_timeout is None else self.loop.time() + self.shutdown_timeout
        while (self._unlinked or any(not t.done() for t in self._casts)) and (
                deadline is None or self.loop.time() < deadline):
            await asyncio.sleep(0.05)

    def stats(self) -> PoolStats:
        runners = [RunnerInfo(r.id, r.handle.url, self._state.runners[r.id].active, r.id in self._stopping)
                   for r in self._runners.values() if r.id in self._state.runners]
        return PoolStats(runners=runners, booting=self._state.booting, waiting=len(self._state.waiters),
                         pid=os.getpid())

    def __repr__(self) -> str:
        s = self.stats() if self._running else None
        live = f" runners={len(s.runners)} booting={s.booting} waiting={s.waiting}" if s else ""
        state = "running" if self._running else ("closed" if self._closed else "new")
        return f"<FlamePool {self.name!r} {state} min={self.min} max={self.max} pid={os.getpid()}{live}>"

    def runner(self, *, timeout: float | None = None) -> FlameRunner:
        """Lease one runner slot: ``async with pool.runner() as runner:``; every call made
        through ``runner`` runs on that one runner. ``timeout`` bounds the wait for the slot
        (default ``boot_timeout``)."""
        return FlameRunner(self, self.boot_timeout if timeout is None else timeout)

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
        opts = CallOptions(self.boot_timeout if timeout is None else timeout,
                           self.timeout if timeout is None else timeout,
                           link, on_progress, track_resources, self._retries(retries))
        with _telemetry.observe_call(self, "call", fn) as obs:
            return await self._call(obs, fn, args, kwargs, opts, self._placement)

    def cast(self, fn: Callable[..., Any], *args: Any, link: bool = True, timeout: float | None = None,
             retries: int | None = None, **kwargs: Any) -> None:
        """Schedule ``fn(*args, **kwargs)`` on a runner and return at once.

        As in FLAME, a cast runs to completion unless ``timeout`` is given; a failed cast
        is logged (``flame_asgi.pool``) with the function's name and the reason.
        """
        # No run limit unless the cast has a timeout (the wait for a slot has boot_timeout).
        opts = CallOptions(self.boot_timeout if timeout is None else timeout, timeout, link, None, False,
                           self._retries(retries), "cast")
        self._cast_on(self._placement, fn, args, kwargs, opts)

    def stream(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
               link: bool = True, on_progress: Callable[[Any], Any] | None = None, **kwargs: Any) -> RemoteStream:
        """Iterate (``async for``) over what generator ``fn(*args, **kwargs)`` yields on a
        runner; ``report(event)`` calls in it reach ``on_progress``, in order with the items."""
        return self._stream_on(self._placement, fn, args, kwargs, timeout, link, on_progress)

    async def place_child(self, fn: Callable[..., Any], *args: Any, link: bool = True,
                          on_progress: Callable[[Any], Any] | None = None, **kwargs: Any) -> ChildHandle:
        """Start long-running ``fn(*args, **kwargs)`` on a runner; it holds a slot until it
        ends. ``await handle.send(message)`` reaches ``flame_asgi.receive()`` in the child."""
        return await self._place_child_on(self._placement, fn, args, kwargs, link, on_progress)

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
